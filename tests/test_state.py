import pytest

from keras_hrp.state import HRPState


def test_state_round_trips_through_a_dict():
    state = HRPState(rank=2, preheat_rank=16, phase="preheat", scale=0.5, preheat_updates=3,
                     factorization="full", auto_rank=True, rank_budget=12_000)
    assert HRPState.from_dict(state.to_dict()) == state
    assert state.current_rank == 16
    assert HRPState.from_dict({"rank": 2}).factorization == "per_head"  # files written before it


@pytest.mark.parametrize("config,message", [
    ({"rank": 2, "factorization": "rows"}, "`factorization` must be one of .*factorization='rows'"),
    ({"rank": 2, "phase": "preheat"}, "a preheating layer needs `preheat_rank`"),
    ({"rank": 2, "colour": 1}, "not an HRP layer state"),
    ({"rank": 0}, "`rank` must be an integer >= 1.*rank=0"),
    ({"rank": 2, "rank_budget": "all"}, "`rank_budget` must be an integer.*rank_budget='all'"),
])
def test_invalid_states_name_the_value(config, message):
    with pytest.raises(ValueError, match=f"layer 'q': {message}"):
        HRPState.from_dict(config, "layer 'q'")
