"""Stage keys: a setting that changes what a stage trains on changes its key; one that does not
keeps it (two recipes share the artifact)."""

from conftest import distill_recipe

from compressor import keys
from compressor.recipe import load_recipe


def _keys(write_recipe, data: dict, **extra) -> list[str]:
    recipe = load_recipe(write_recipe(distill_recipe(data=data, **extra)))
    return keys.stage_keys(recipe, "teacher", keys.data_identity(recipe.spec.data))


def test_what_the_stages_read_of_the_data_is_in_their_keys(write_recipe, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"document {i} " + "word " * 50 for i in range(40)))
    base = {"train": str(text), "seq_len": 64}
    first = _keys(write_recipe, base)
    # the block length (a prune's calibration blocks, teacher answers' prompts) and the token budget
    assert _keys(write_recipe, {**base, "seq_len": 128}) != first
    assert _keys(write_recipe, {**base, "max_train_tokens": 1024}) != first
    # the held-out share cut from the end of the training text, when that is where it comes from
    assert _keys(write_recipe, {**base, "heldout_fraction": 0.2}) != first
    named = {**base, "heldout": str(text)}
    assert _keys(write_recipe, {**named, "heldout_fraction": 0.2}) == _keys(write_recipe, named)
    # measurement settings change no artifact
    assert _keys(write_recipe, base, seed=0, eval={"tasks": [], "fidelity": {"samples": 2}}) == first
