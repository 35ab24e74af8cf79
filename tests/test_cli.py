"""The command line as a newcomer meets it: help that explains, --version, a hub that cannot be
reached, a full disk, Ctrl-C — each one clear line, and nothing left behind."""

import errno

import pytest
from conftest import distill_recipe

from compressor import __version__
from compressor.cli import main, parser


def test_version_and_every_command_explains_itself_with_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"compressor {__version__}"
    sub = next(a for a in parser()._actions if a.dest == "command")
    for name, command in sub.choices.items():
        text = command.format_help()
        assert command.description, name
        assert "example: compressor" in text or name == "teacher", name
        for action in command._actions:
            assert action.help or action.dest == "help" or action.dest == "action", (name, action.dest)
    export = sub.choices["export"].format_help()
    assert "required:\n  --out" in export  # a required flag is not listed among the options
    assert "$COMPRESSOR_DATA" in sub.choices["eval"].format_help()


def test_a_hub_model_without_the_hub_fails_in_seconds_and_leaves_nothing(tmp_path, write_recipe, capsys):
    recipe = distill_recipe(teacher="hf:some-org/not-cached-model")
    out = tmp_path / "out"
    assert main(["run", str(write_recipe(recipe)), "--out", str(out)]) == 2  # HF_HUB_OFFLINE is set (conftest)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hub cannot be reached" in err[0] and "hf:./path/to/model" in err[0]
    assert not out.exists()


def test_ctrl_c_in_a_stage_says_where_the_rerun_resumes(
    tmp_path, write_recipe, capsys, monkeypatch, tiny_teacher_folder
):
    from compressor import train

    original = train.checkpointed

    def interrupt_after_the_first_checkpoint(step, total):
        original(step, total)
        raise KeyboardInterrupt  # as if Ctrl-C came right after the checkpoint at step 2

    monkeypatch.setattr(train, "checkpointed", interrupt_after_the_first_checkpoint)
    path = write_recipe(distill_recipe(steps=6))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "interrupted in stage 'distill': finished stages are kept; rerun the same command to resume it "
        "from its checkpoint at step 2/6"
    )


def test_a_full_disk_is_one_line(tmp_path, write_recipe, capsys, monkeypatch, tiny_teacher_folder):
    from compressor import storage

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "store" / "x"))

    monkeypatch.setattr(storage, "_fsync_tree", full)
    path = write_recipe(distill_recipe(steps=2))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no space left on the device writing ") and "rerun" in err[-1]
    kept = {p.name for p in (tmp_path / "store").iterdir()}
    assert not {k for k in kept if k.startswith(".tmp")} and kept <= {"measurements", ".locks", ".partial"}
