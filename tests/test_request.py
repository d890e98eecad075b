import pytest

from tasks.request import AMERICAN_BREEDS, parse_request


def test_defaults_follow_the_original_readme():
    req = parse_request({})
    assert req.queries == AMERICAN_BREEDS and len(req.queries) == 9
    assert (req.chips_name, req.pages, req.size, req.google_domain) == ("dog", 2, "500x500", "google.com")
    assert req.dataset.startswith("dog-") and len(req.dataset) == 12
    assert req.labels()[1] == "alaskan-malamute"


def test_same_request_same_dataset_name():
    a = parse_request({"queries": ["Boston Terrier", "Boykin Spaniel"]})
    b = parse_request({"queries": ["Boykin Spaniel", "Boston Terrier"]})
    assert a.dataset == b.dataset
    assert parse_request({"queries": ["Boston Terrier"], "pages": 3}).dataset != a.dataset


@pytest.mark.parametrize("kwargs, message", [
    ({"pages": 0}, "pages"),
    ({"pages": "many"}, "pages"),
    ({"queries": []}, "queries"),
    ({"queries": ["  "]}, "1-200 characters"),
    ({"queries": ["Pug", "pug"]}, "repeats"),
    ({"size": "500"}, "500x500"),
    ({"google_domain": "evil.example"}, "google.com"),
    ({"dataset": "../../etc"}, "not a valid name"),
    ({"dataset": "__import__('os')"}, "not a valid name"),
    ({"engine": "bing"}, "engine"),
    ({"colour": "red"}, "colour"),
    ({"spec": {"model": "__import__('os').system('x')"}}, "unknown model"),
    ({"on_missing_chip": "whatever"}, "on_missing_chip"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        parse_request(kwargs)
    assert message in str(err.value)
    assert str(err.value).startswith("invalid collect_breeds arguments")
