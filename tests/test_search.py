"""The SerpApi client against the replay service and scripted error answers, over HTTP."""
import json

import pytest

from tests.conftest import SHARED_FIXTURES
from tests.scripted_server import ScriptedServer
from workers.replay import ReplayServer
from workers.search import SearchError, SerpApiClient
from workers.store import LocalStore

KEY = "test-secret-key-123"


@pytest.fixture(scope="module")
def replay():
    with ReplayServer(api_key=KEY) as server:
        yield server


def client(url, store=None, engine="google_images", **kw):
    sleeps = []
    c = SerpApiClient(url, KEY, engine=engine, store=store, sleep=sleeps.append, **kw)
    c.sleeps = sleeps
    return c


@pytest.mark.parametrize("engine, param", [("google_images", "uds"), ("google", "chips")])
def test_resolves_token_by_name_case_insensitively_and_pages(replay, engine, param):
    c = client(replay.url, engine=engine)
    tok = c.resolve_token("Alaskan Malamute", "DOG")
    assert tok.token_param == param and tok.token and tok.note is None
    assert "dog" in tok.suggestions
    results = c.page("Alaskan Malamute", 1, token_param=tok.token_param, token=tok.token)
    assert len(results) == 50
    assert len({r.original for r in results}) == 50
    assert all(r.original.startswith(replay.url + "/images/alaskan-malamute/1/") for r in results)
    last = replay.search_log[-1]
    assert last["token_name"] == "dog" and last["token_valid"] is True
    assert last["params"]["q"] == "Alaskan Malamute imagesize:500x500"  # size operator in the query text
    assert "api_key" not in json.dumps(last)


def test_identical_requests_come_from_the_store_cache(replay, tmp_path):
    store = LocalStore(tmp_path)
    c = client(replay.url, store=store)
    before = replay.search_count
    a = c.resolve_token("Boston Terrier", "dog")
    b = c.resolve_token("Boston Terrier", "dog")
    assert a == b
    assert replay.search_count - before == 1 and c.calls == 1
    cached = store.list("serpapi-cache/")
    assert len(cached) == 1 and KEY not in store.get_bytes(cached[0]).decode()
    c.resolve_token("Boston Terrier", "dog", no_cache=True)
    assert replay.search_count - before == 2


def test_missing_name_policy(replay):
    c = client(replay.url)
    tok = c.resolve_token("Boykin Spaniel nodogchip", "dog")
    assert tok.token is None and "searched unfiltered" in tok.note and "dog" not in tok.suggestions
    assert "skipped" in c.resolve_token("Boykin Spaniel nodogchip", "dog", on_missing="skip").note
    with pytest.raises(SearchError) as err:
        c.resolve_token("Boykin Spaniel nodogchip", "dog", on_missing="fail")
    assert err.value.reason == "no_token"


def test_invalid_key_fails_at_once_with_serpapis_message(replay):
    c = SerpApiClient(replay.url, "wrong-key", sleep=lambda s: None)
    with pytest.raises(SearchError) as err:
        c.resolve_token("Pug", "dog")
    assert err.value.reason == "invalid_key" and err.value.status == 401
    assert "Your API key should be here" in err.value.message
    assert "wrong-key" not in err.value.message
    assert c.calls == 1  # no retry storm


def test_no_results_is_retried_once_then_reported(replay):
    c = client(replay.url)
    before = replay.search_count
    with pytest.raises(SearchError) as err:
        c.resolve_token("zznoresults", "dog")
    assert err.value.reason == "no_results"
    assert "hasn't returned any results" in err.value.message
    assert replay.search_count - before == 2


def test_429_waits_the_advised_time_then_succeeds():
    ok = {"suggested_searches": [{"name": "dog", "uds": "TOKEN"}], "images_results": []}
    with ScriptedServer([(429, {"Retry-After": "3"}, '{"error": "Too many requests"}'), (200, {}, json.dumps(ok))]) as s:
        c = client(s.url)
        tok = c.resolve_token("Pug", "dog")
    assert tok.token == "TOKEN" and c.sleeps == [3.0] and len(s.requests) == 2
    assert s.requests[0]["params"]["api_key"] == KEY  # sent to SerpApi, nowhere else


def test_500s_are_retried_then_fail_with_status():
    with ScriptedServer([(500, {}, '{"error": "Internal"}')]) as s:
        c = client(s.url, max_attempts=3)
        with pytest.raises(SearchError) as err:
            c.page("Pug", 0, token_param=None, token=None)
    assert err.value.reason == "server_error" and err.value.status == 500 and len(s.requests) == 3
    assert len(c.sleeps) == 2


def test_out_of_searches_is_not_retried():
    with ScriptedServer([(429, {}, '{"error": "Your account credit is too low, please add more credits."}')]) as s:
        c = client(s.url)
        with pytest.raises(SearchError) as err:
            c.resolve_token("Pug", "dog")
    assert err.value.reason == "out_of_searches" and len(s.requests) == 1


def test_malformed_json_is_a_clear_error():
    with ScriptedServer([(200, {"Content-Type": "application/json"}, '{"images_results": [')]) as s:
        c = client(s.url, max_attempts=2)
        with pytest.raises(SearchError) as err:
            c.page("Pug", 0, token_param=None, token=None)
    assert err.value.reason == "bad_response" and "not JSON" in err.value.message


def test_unreachable_service_says_where():
    from tasks.embedded import free_port

    c = client(f"http://127.0.0.1:{free_port()}", max_attempts=2)
    with pytest.raises(SearchError) as err:
        c.resolve_token("Pug", "dog")
    assert err.value.reason == "unreachable" and "cannot reach SerpApi" in err.value.message


def test_api_key_cannot_be_passed_as_a_parameter(replay):
    with pytest.raises(ValueError):
        client(replay.url).search({"q": "x", "api_key": "k"})


def test_client_repr_hides_key(replay):
    assert KEY not in repr(client(replay.url))


FIXTURES = SHARED_FIXTURES / "serpapi" / "responses"


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures/serpapi is not present in this checkout")
@pytest.mark.parametrize("name, chips_name, param", [
    ("google-images-engine_2025-06-18_uds-suggested-searches_81-images.json", "anime", "uds"),
    ("google-tbm-isch_2023-03-25_imagenes-chicas_26-suggested-searches_100-images.json", "Lindas", "chips"),
])
def test_real_serpapi_responses(name, chips_name, param):
    body = (FIXTURES / name).read_text()
    data = json.loads(body)
    with ScriptedServer([(200, {"Content-Type": "application/json"}, body)]) as s:
        c = client(s.url)
        tok = c.resolve_token("q", chips_name)
        results = c.page("q", 0, token_param=tok.token_param, token=tok.token)
    expected = next(x[param] for x in data["suggested_searches"] if x["name"].lower() == chips_name.lower())
    assert tok.token_param == param and tok.token == expected
    assert len(results) == len(data["images_results"])
    assert results[0].original == data["images_results"][0]["original"]


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures/serpapi is not present in this checkout")
def test_real_response_without_suggestions_searches_unfiltered():
    body = (FIXTURES / "google-tbm-isch_2022-01-17_gibberish-query_100-images.json").read_text()
    with ScriptedServer([(200, {}, body)]) as s:
        tok = client(s.url, engine="google").resolve_token("Jdkasjdlsajdkasjdlksa", "dog")
    assert tok.token is None and "offered: none" in tok.note


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures/serpapi is not present in this checkout")
@pytest.mark.parametrize("name, status, reason", [
    ("transcribed_invalid-api-key_http401.json", 401, "invalid_key"),
    ("transcribed_google-images-no-results_http200.json", 200, "no_results"),
    ("official-sample_credit-too-low__google-search-results-golang.json", 429, "out_of_searches"),
])
def test_real_error_bodies(name, status, reason):
    body = (SHARED_FIXTURES / "serpapi" / "errors" / name).read_text()
    with ScriptedServer([(status, {}, body)]) as s:
        with pytest.raises(SearchError) as err:
            client(s.url).resolve_token("Pug", "dog")
    assert err.value.reason == reason
    assert json.loads(body)["error"] in err.value.message
