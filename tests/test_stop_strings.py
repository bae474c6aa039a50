"""Stop strings: one implementation, shared by `chat` (the native engine) and `serve`'s scheduler.

The reply ends just before the earliest place any stop string occurs, whatever order the stops were
given in, and nothing that may still turn out to be a stop string is shown early.
"""

from __future__ import annotations

from setup_kit.stop_strings import StopStrings


def feed_all(stops, pieces):
    s = StopStrings(stops)
    shown, hit = [], False
    for piece in pieces:
        text, hit = s.feed(piece)
        shown.append(text)
        if hit:
            return "".join(shown), True
    text, hit = s.flush()
    return "".join(shown) + text, hit


def test_a_possible_start_is_held_back_until_it_is_decided():
    stops = StopStrings(("<END>",))
    assert stops.feed("hello <") == ("hello ", False)
    assert stops.feed("EN") == ("", False)
    assert stops.feed("D> more") == ("", True)
    stops = StopStrings(("<END>",))
    assert stops.feed("a <E") == ("a ", False)
    assert stops.feed("x") == ("<Ex", False)


def test_the_earliest_match_wins_not_the_first_in_the_list():
    assert feed_all(["world", "lo"], ["hello world"]) == ("hel", True)
    assert feed_all(["lo", "world"], ["hello world"]) == ("hel", True)


def test_a_longer_stop_still_growing_from_earlier_wins_over_a_later_complete_one():
    # "bc" is complete at 1, but "abcd" may still complete from 0: wait, then cut at the earliest.
    assert feed_all(["bc", "abcd"], ["xab", "c", "d tail"]) == ("x", True)
    assert feed_all(["bc", "abcd"], ["xab", "c", "e tail"]) == ("xa", True)


def test_a_stop_completed_in_the_last_text_cuts_there_at_flush():
    s = StopStrings(["END"])
    assert s.feed("done EN") == ("done ", False)
    assert s.flush() == ("EN", False)
    s = StopStrings(["bc", "abcd"])
    assert s.feed("abc") == ("", False)
    assert s.flush() == ("a", True)


def test_serve_and_the_native_engine_use_this_implementation():
    import setup_kit.engines.native as native
    import setup_kit.serve.scheduler as scheduler

    assert native.StopStrings is StopStrings
    assert scheduler.StopStrings is StopStrings
