"""gpu_check.py end to end on the CPU with a tiny model: the script a GPU user runs must work."""
import random

import gpu_check
from conftest import make_tiny_encoding

WORDS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "stone"]
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--vocab_size=384",
        "--seq_len=32", "--batch_size=4", "--total_batch_size=8", "--meta_seq_len=16",
        "--n_way=4", "--k_shot=2", "--q_query=2", "--inner_steps=5", "--inner_lr=0.5",
        "--meta_hidden=32", "--episodes_per_step=2", "--dtype=bfloat16", "--compile=False"]


def test_gpu_check_runs_on_cpu(tmp_path):
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60))
                                for _ in range(300)))
    enc = make_tiny_encoding(WORDS)
    # the default band (10 to 300 per million) suits real text, not 8 words of 11% each
    report = gpu_check.check([str(text)], enc, str(tmp_path / "work"), "configs/cpu.py", TINY,
                             steps=6, run_bench=False,
                             index_args=dict(min_per_million=0, max_per_million=10 ** 6))
    steps = report["train"]["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert {s["meta_loss"] is None for s in steps} == {True, False}  # both kinds of step
    assert report["resume_max_abs_diff"] == 0.0  # CPU kernels are deterministic
    inner = report["inner_loop"]
    # under bf16 autocast the inner steps lower the loss as they do in fp32 (stale bf16 weights
    # would leave it where it was)
    drop = inner["run autocast, 0 inner steps"] - inner["run autocast, 5 inner steps"]
    assert drop > 0.005
    assert abs(inner["run autocast, 5 inner steps"] - inner["fp32, 5 inner steps"]) < 0.2 * drop
    assert "graph_breaks" in report["train"]
    assert "inner loop" in gpu_check.format_report(report)
