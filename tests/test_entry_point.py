"""`torch.compile(model, backend="dali")` works in a fresh interpreter that never imported dali_compile."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_backend_is_found_through_the_entry_point():
    code = textwrap.dedent(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM, MixtralConfig

        config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        ids = torch.randint(0, 64, (1, 6))
        assert "dali_compile" not in sys.modules
        with torch.no_grad():
            want = model(ids).logits
            got = torch.compile(model, backend="dali", options={"inductor": False})(ids).logits
        import dali_compile
        print(dali_compile.last_report().num_rewritten, float((got - want).abs().max()))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rewritten, error = result.stdout.split()[-2:]
    assert int(rewritten) == 2
    assert float(error) < 1e-5
