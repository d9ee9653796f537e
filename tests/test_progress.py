"""jaxinfer.progress: bars only on a terminal / in Jupyter / when forced; wired into generate and GPTQ."""
from __future__ import annotations

import io

import numpy as np
import pytest

from jaxinfer import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _draw(stream, **kwargs):
    with progress.bar(3, "work", "step", stream=stream, **kwargs) as bar:
        for _ in range(3):
            bar.update(1)
    return stream.getvalue()


def test_bar_is_off_when_not_a_tty_and_on_when_forced(monkeypatch):
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    assert _draw(io.StringIO()) == ""  # a pipe / log file: nothing
    forced = _draw(io.StringIO(), enabled=True)
    assert "work" in forced and "3/3" in forced
    assert "3/3" in _draw(_Tty())  # a terminal: drawn
    assert _draw(_Tty(), enabled=False) == ""  # explicitly off wins over the terminal


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("1", True), ("true", True)])
def test_environment_variable(monkeypatch, value, on):
    monkeypatch.setenv(progress.ENV_VAR, value)
    assert progress.is_enabled(stream=_Tty()) is on
    assert progress.is_enabled(stream=io.StringIO()) is on
    assert progress.is_enabled(False) is False and progress.is_enabled(True) is True  # the argument wins


def test_bad_values_are_named(monkeypatch):
    monkeypatch.setenv(progress.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=progress.ENV_VAR):
        progress.is_enabled()
    with pytest.raises(ValueError, match="progress"):
        progress.is_enabled("yes")


def test_generate_over_many_prompts_shows_a_bar_only_when_asked(monkeypatch, capsys):
    from jaxinfer import InferenceSession, SamplingParams
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    params = SamplingParams(max_tokens=2, temperature=0.0)
    with InferenceSession.from_pretrained("tiny-code") as session:
        capsys.readouterr()
        quiet = session.generate(["def a():", "def b():", "import os"], params)  # stderr is captured: no TTY
        assert "generate" not in capsys.readouterr().err
        shown = session.generate(["def a():", "def b():", "import os"], params, progress=True)
        err = capsys.readouterr().err
        assert "generate" in err and "3/3" in err
        assert [o.token_ids for o in shown] == [o.token_ids for o in quiet]
        with pytest.raises(ValueError, match="progress"):
            session.generate(["def a():"], params, progress="on")


def test_gptq_bar_counts_decoder_layers(capsys):
    from jaxinfer.config import ModelConfig
    from jaxinfer.models.transformer import init_params
    from jaxinfer.quant import QuantConfig, quantize
    import jax
    config = ModelConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=32, max_position_embeddings=32)
    params = init_params(config, jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, 64, size=(2, 8))
    quant = QuantConfig(group_size=32, calibration_batch_size=2)
    capsys.readouterr()
    out = quantize(config, params, "int4-gptq", quant, calibration_tokens=tokens, progress=True)
    err = capsys.readouterr().err
    assert "GPTQ" in err and "1/1" in err and "layer" in err  # one decoder layer (the LM head stays float)
    assert "packed" in out["layers_0"]["mlp"]["down_proj"]
