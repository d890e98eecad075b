"""workers.slots: the decode slots and per-host caps of the download threads."""
import threading

import pytest

from workers.slots import HostSlots, Slots


def test_slots_let_at_most_the_limit_in_at_once():
    slots = Slots(2)
    inside, most, lock = [0], [0], threading.Lock()
    gate = threading.Barrier(6)

    def holder():
        gate.wait()
        for _ in range(50):
            with slots:
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                threading.Event().wait(0.0005)
                with lock:
                    inside[0] -= 1

    threads = [threading.Thread(target=holder) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert most[0] == 2 and inside[0] == 0
    assert slots.free() == 2  # every slot handed back


def test_a_slot_is_handed_back_when_the_holder_raises():
    slots = Slots(1)
    with pytest.raises(RuntimeError):
        with slots:
            raise RuntimeError("decode failed")
    assert slots.free() == 1


def test_slot_limits_below_one_are_refused():
    with pytest.raises(ValueError):
        Slots(0)
    with pytest.raises(ValueError):
        HostSlots(0)


def test_host_slots_are_per_host():
    slots = HostSlots(1)
    with slots.hold("a:80"):
        done = threading.Event()

        def other_host():
            with slots.hold("b:80"):  # another host is not held up by a:80
                done.set()

        t = threading.Thread(target=other_host)
        t.start()
        assert done.wait(5)
        t.join(5)
        assert slots.active_keys() == 1
    assert slots.active_keys() == 0
