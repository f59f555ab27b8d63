"""One thread count for every command (``--threads``, ``$NSRU_THREADS``), and progress bars for the
statistics and self-sample passes that used to run silently before training's bar."""

import os

import pytest
import torch

import nsru
from nsru import cli
from nsru.bench.models import default_threads
from nsru.self_samples import sample_self
from nsru.stats_sources import encode_rows, global_source_means
from nsru.threads import ENV, available_cpus, resolve_threads, use_threads
from tinylm import one_thread, tiny_llama, tiny_world, word_tokenizer

COMMANDS = [module.NAME for module in cli.COMMANDS]


@pytest.fixture
def clean_env(monkeypatch):
    """No thread setting in the environment; whatever a test sets is undone afterwards."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return monkeypatch


def _other_count() -> int:
    """A count that differs from torch's current one, so setting it is visible."""
    return 2 if torch.get_num_threads() == 1 else 1


def test_flag_beats_env_beats_omp_beats_the_default(clean_env):
    assert resolve_threads() == 1
    clean_env.setenv("OMP_NUM_THREADS", "4,2")  # an OpenMP list is OpenMP's business: ignored
    assert resolve_threads() == 1
    clean_env.setenv("OMP_NUM_THREADS", "4")
    assert resolve_threads() == 4
    clean_env.setenv(ENV, " ")  # blank: as if unset
    assert resolve_threads() == 4
    clean_env.setenv(ENV, "2")
    assert resolve_threads() == 2 == default_threads()  # the benchmarks ask the same resolver
    assert resolve_threads(3) == resolve_threads("3") == 3


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", "", True, 4 * available_cpus() + 1])
def test_invalid_counts_say_which_setting_and_what_is_expected(clean_env, bad):
    limit = 4 * available_cpus()
    expected = f"whole number of threads from 1 to {limit}"
    with pytest.raises(ValueError, match=f"^--threads must be a {expected}.*got '{bad}'$"):
        resolve_threads(bad)
    if bad not in ("", True):
        clean_env.setenv(ENV, str(bad))
        with pytest.raises(ValueError, match=f"^{ENV} must be a {expected}.*got '{bad}'$"):
            resolve_threads()
        with pytest.raises(ValueError, match=f"^{ENV} must"):
            default_threads()


def test_use_threads_sets_torch_and_the_environment_then_restores_them(clean_env):
    before = torch.get_num_threads()
    clean_env.setenv(ENV, "3")
    n = _other_count()
    with use_threads(n):
        assert torch.get_num_threads() == n
        assert os.environ[ENV] == os.environ["OMP_NUM_THREADS"] == str(n)
        assert resolve_threads() == n
    assert torch.get_num_threads() == before
    assert os.environ[ENV] == "3" and "OMP_NUM_THREADS" not in os.environ
    with pytest.raises(ValueError, match="threads must be"), use_threads(0):
        pass


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_takes_threads(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--threads N" in out and ENV in out
    assert out.startswith("usage:") and "[--threads N]" in out.split("\n\n")[0]


def _record_threads(monkeypatch) -> list:
    seen = []

    def fake_run(args, overrides):
        seen.append((torch.get_num_threads(), os.environ.get(ENV)))
        return 0

    monkeypatch.setattr(cli.export, "run", fake_run)
    return seen


def test_main_runs_the_command_with_the_threads_asked_for(clean_env):
    seen = _record_threads(clean_env)
    before = torch.get_num_threads()
    n = _other_count()
    clean_env.setenv(ENV, str(3 - n))  # the flag wins over the environment
    assert cli.main(["export", "--adapter", "a", "--out", "b", "--threads", str(n)]) == 0
    clean_env.setenv(ENV, str(n))  # without the flag, the environment
    assert cli.main(["export", "--adapter", "a", "--out", "b"]) == 0
    clean_env.delenv(ENV)
    torch.set_num_threads(2)  # without either, the default (1) whatever torch had
    try:
        assert cli.main(["export", "--adapter", "a", "--out", "b"]) == 0
        assert torch.get_num_threads() == 2  # restored when the command returns
    finally:
        torch.set_num_threads(before)
    assert seen == [(n, str(n)), (n, str(n)), (1, "1")]
    assert ENV not in os.environ


@pytest.mark.parametrize("argv, env, message", [
    (["--threads", "0"], None, "nsru export: --threads must be a whole number of threads from 1 to"),
    (["--threads", "many"], None, "got 'many'"),
    ([], "-1", f"nsru export: {ENV} must be a whole number of threads from 1 to"),
])
def test_bad_threads_exit_2_with_one_line(clean_env, capsys, argv, env, message):
    seen = _record_threads(clean_env)
    if env is not None:
        clean_env.setenv(ENV, env)
    assert cli.main(["export", "--adapter", "a", "--out", "b", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert seen == []  # the command never ran


# --- progress bars of the passes before training ---------------------------------------------------


@pytest.fixture
def world():
    forget, retain = tiny_world()
    tok = word_tokenizer([r["question"] + " " + r["answer"] for r in forget + retain])
    return tiny_llama(len(tok)), tok, forget, retain


def _batches(tok):
    from nsru.data import input_batches, pad_token_id

    return lambda encodings: input_batches(encodings, pad_token_id(tok), torch.device("cpu"))


@pytest.mark.parametrize("progress", [True, False])
def test_statistics_and_self_samples_show_a_bar_when_progress_is_on(world, capfd, tmp_path, progress):
    model, tok, forget, retain = world
    nsru.apply_nsru(model, r=2)
    with one_thread():
        sources = {"retain": encode_rows(retain, tok, None), "self": encode_rows(retain[:3], tok, None)}
        global_source_means(model, sources, _batches(tok), progress=progress)
        sample_self(model, tok, 5, max_new_tokens=2, batch_size=2, cache=tmp_path, progress=progress)
        sample_self(model, tok, 5, max_new_tokens=2, batch_size=2, cache=tmp_path, progress=progress)  # cached
    err = capfd.readouterr().err
    if progress:
        assert "statistics (retain):" in err and "statistics (self):" in err
        assert err.count("self-samples:") >= 1 and "/5 [" in err  # counts samples; none when cached
        assert err.count("self-samples:   0%") == 1
    else:
        assert "statistics" not in err and "self-samples" not in err and "%|" not in err


@pytest.mark.parametrize("progress", [True, False])
def test_unlearn_passes_its_progress_option_down(world, capfd, progress):
    model, tok, forget, retain = world
    with one_thread():
        nsru.unlearn(model, tok, forget, retain, steps=1, batch_size=4, stats="retain", init="forget",
                     progress=progress)
    err = capfd.readouterr().err
    # one leakage bar: every leakage set (statistics data, forget data) is measured in one pass
    for bar in ("statistics (retain):", "leakage:", "forget statistics:", "unlearn[nsru]"):
        assert (bar in err) == progress, bar
