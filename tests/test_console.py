"""What the console shows: one compact line per GRPO step, and vLLM's unactionable CPU warnings dropped."""
import logging

from steer_heal.console import VLLMNoiseFilter, step_line


def test_step_line_is_one_compact_line():
    logs = {"loss": 2.27, "grad_norm": 0.71, "rewards/trait_llr/mean": 0.0054, "rewards/trait_llr/std": 0.03,
            "rewards/incoherence/mean": -0.52, "rewards/refusal/mean": -0.125, "reward": -0.6397,
            "nll_kept": 2.267, "kl_rmse": 0.0091, "barrier_active_frac": 0.0, "keep_frac": 0.875, "kappa": 1.0,
            "step_time": 13.98, "step": 3}
    assert step_line(logs, 8) == ("step 3/8  reward -0.640 (trait +0.01 incoh -0.52 refus -0.12)  nll 2.267  "
                                  "kl_rmse 0.009  barrier 0.00  keep 0.88  kappa 1  14.0s")
    assert step_line({"train_runtime": 100.0, "step": 8}, 8) is None  # the closing summary keeps TRL's line


def test_vllm_noise_filter_keeps_what_a_user_can_act_on():
    f = VLLMNoiseFilter()

    def rec(msg):
        return logging.LogRecord("vllm.x", logging.WARNING, "f", 1, msg, None, None)

    assert not f.filter(rec("libtcmalloc is not found in LD_PRELOAD. For best performance, ..."))
    assert not f.filter(rec("Kernel vllm.v1.worker.block_table.X.kernel is already registered. Overwriting."))
    assert f.filter(rec("Not enough memory for the KV cache; lower max_model_len"))


def test_vllm_filter_is_in_the_config_vllm_applies_at_engine_start():
    """vLLM (re)configures its handler from DEFAULT_LOGGING_CONFIG when an engine starts: the filter
    must be in that config, and on the last-resort handler that prints before it."""
    import importlib.util
    import logging

    import pytest

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM not installed")
    from logging.config import dictConfig

    import vllm.logger

    from steer_heal.console import quiet_vllm_logs

    quiet_vllm_logs()
    assert any(isinstance(f, VLLMNoiseFilter) for f in logging.lastResort.filters)
    cfg = __import__("copy").deepcopy(vllm.logger.DEFAULT_LOGGING_CONFIG)
    dictConfig(cfg)  # what vLLM's configure_logging does
    handlers = logging.getLogger("vllm").handlers
    assert handlers and all(any(isinstance(f, VLLMNoiseFilter) for f in h.filters) for h in handlers)


def test_held_stderr_drops_noise_lines_written_below_python(capfd):
    """Writes to file descriptor 2 (as C++ warnings and progress bars make) come back without the
    noise lines, in order, also when the block raises."""
    import os

    import pytest

    from steer_heal.console import held_stderr

    with held_stderr(("NUMA binding",)):
        os.write(2, b"[W utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy\nkeep me\n")
    assert capfd.readouterr().err == "keep me\n"
    with pytest.raises(RuntimeError), held_stderr(("NUMA binding",)):
        os.write(2, b"first\nNUMA binding again\nlast words\n")
        raise RuntimeError("boom")
    assert capfd.readouterr().err == "first\nlast words\n"
