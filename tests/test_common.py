"""common.check_config: every refusal, named by its key, and the boundary values just inside
each range, which must pass (so that < and <= cannot be swapped unseen)."""
from types import SimpleNamespace

import pytest

import common
import meta_train
from common import ConfigError


def cfg(tmp_path, **kw):
    # the defaults describe a valid run but for data_dir, which must exist
    return SimpleNamespace(**{**meta_train.DEFAULTS, "data_dir": str(tmp_path), **kw})


def test_defaults_pass(tmp_path):
    common.check_config(cfg(tmp_path), 1)


CHOICE_KEYS = ["meta_task", "positions_unknown", "inner_params", "lr_schedule",
               "inner_lr_schedule", "inner_optimizer", "decay_params", "meta_head_init", "dtype",
               "init", "head_grad", "meta_read", "meta_features", "meta_head_rows"]


@pytest.mark.parametrize("key", CHOICE_KEYS)
def test_every_choice_key_refuses_other_values_and_takes_each_of_its_own(tmp_path, key):
    assert set(CHOICE_KEYS) == set(common.CHOICES)  # a new choice key gets this test too
    with pytest.raises(ConfigError, match=rf"^{key} must be one of .*got 'nope'"):
        common.check_config(cfg(tmp_path, **{key: "nope"}), 1)
    for value in common.CHOICES[key]:
        # lm needs the whole model adapted; every other value stands alone
        extra = {"inner_params": "all"} if value == "lm" else {}
        common.check_config(cfg(tmp_path, **{key: value, **extra}), 1)


# (key, a refused value, the message, an accepted value at the edge of the range)
REFUSED = [
    ("meta_ratio", 1.01, "meta_ratio must be in [0, 1]", 1.0),
    ("meta_ratio", -0.01, "meta_ratio must be in [0, 1]", 0.0),
    ("n_way", 1, "n_way must be at least 2, got 1", 2),
    ("k_shot", 0, "k_shot must be at least 1, got 0", 1),
    ("q_query", 0, "q_query must be at least 1, got 0", 1),
    ("inner_steps", -1, "inner_steps must be at least 0, got -1", 0),
    *[(k, 0, f"{k} must be at least 1, got 0", 1) for k in (
        "seq_len", "meta_seq_len", "eval_interval", "eval_sequences", "save_interval",
        "log_interval", "positions_batch")],
    ("batch_size", 0, "batch_size must be at least 1, got 0", None),
    ("total_batch_size", 0, "total_batch_size must be at least 1, got 0", None),
    *[(k, -1, f"{k} must be at least 0, got -1", 0) for k in (
        "max_steps", "warmup_steps", "lr_decay_steps", "eval_episodes", "inner_warmup_steps",
        "episodes_per_step")],
    *[(k, -1e-9, f"{k} must be at least 0, got -1e-09", 0.0) for k in (
        "learning_rate", "min_lr", "weight_decay", "grad_clip", "inner_lr", "inner_eps",
        "inner_weight_decay")],
    ("learning_rate", float("nan"), "learning_rate must be at least 0, got nan", None),
    *[(k, 1.0, f"{k} must be in [0, 1), got 1.0", 0.0) for k in (
        "beta1", "beta2", "inner_beta1", "inner_beta2")],
    *[(k, -0.1, f"{k} must be in [0, 1), got -0.1", 0.999) for k in (
        "beta1", "beta2", "inner_beta1", "inner_beta2")],
    ("ar_mask_rate", 1.0, "ar_mask_rate must be in [0, 1), got 1.0", 0.0),
    ("ar_mask_rate", -0.01, "ar_mask_rate must be in [0, 1), got -0.01", 0.999),
]


@pytest.mark.parametrize("key, bad, message, edge", REFUSED)
def test_each_range_refuses_just_outside_and_takes_its_edge(tmp_path, key, bad, message, edge):
    with pytest.raises(ConfigError) as e:
        common.check_config(cfg(tmp_path, **{key: bad}), 1)
    assert message in str(e.value)
    if edge is not None:
        common.check_config(cfg(tmp_path, **{key: edge}), 1)


def test_lm_task_needs_every_weight_adapted(tmp_path):
    with pytest.raises(ConfigError, match="meta_task 'lm' adapts the whole model"):
        common.check_config(cfg(tmp_path, meta_task="lm", inner_params="head"), 1)


def test_a_step_splits_over_ranks_unless_they_cannot_share_the_batch(tmp_path):
    # batch_size is a ceiling: 96 sequences under a ceiling of 64 are 2 micro-batches of 48
    lay = common.layout(cfg(tmp_path, batch_size=64, total_batch_size=96), 1)
    assert (lay.per_rank, lay.micro, lay.accum) == (96, 48, 2)
    # 3 episodes over 2 ranks: slot s on rank s % 2; a vanilla run never draws one
    assert common.layout(cfg(tmp_path, episodes_per_step=3), 2).episodes == [2, 1]
    assert common.layout(cfg(tmp_path, episodes_per_step=3, meta_ratio=0.0), 2).episodes == [0, 0]
    common.check_config(cfg(tmp_path, batch_size=32, total_batch_size=256), 2)
    # 256 sequences cannot be shared equally by 3 ranks: refused with a value that works
    with pytest.raises(ConfigError, match=r"^total_batch_size 256 does not split over 3 ranks: set "
                                          r"total_batch_size=192 or 288 \(full micro-batches"):
        common.check_config(cfg(tmp_path, batch_size=32, total_batch_size=256), 3)
    for n, micro_accum in ((192, (32, 2)), (288, (32, 3)), (258, (2, 43))):
        common.check_config(cfg(tmp_path, batch_size=32, total_batch_size=n), 3)
        got = common.layout(cfg(tmp_path, batch_size=32, total_batch_size=n), 3)
        assert (got.micro, got.accum) == micro_accum
    # a layout that runs but with tiny micro-batches says so, naming the full ones
    c = cfg(tmp_path, batch_size=32, total_batch_size=258)
    lines = meta_train.plan_lines(c, meta_train.plan(c, 3), 3)
    assert lines[1] == ("warning: micro-batch 2 is far below batch_size 32; total_batch_size=192 "
                        "or 288 would run full micro-batches")


def test_head_counts_and_data_dir(tmp_path):
    with pytest.raises(ConfigError, match="dim 96 must be a multiple of n_heads 5"):
        common.check_config(cfg(tmp_path, n_heads=5), 1)
    with pytest.raises(ConfigError, match="n_heads a multiple of n_kv_heads 5"):
        common.check_config(cfg(tmp_path, n_kv_heads=5), 1)
    with pytest.raises(ConfigError, match=f"data_dir '{tmp_path}/none' not found"):
        common.check_config(cfg(tmp_path, data_dir=str(tmp_path / "none")), 1)


def test_model_args_context_covers_ar_batches_and_episodes(tmp_path):
    for seq_len, meta_seq_len in ((512, 128), (64, 256)):
        a = common.model_args(cfg(tmp_path, seq_len=seq_len, meta_seq_len=meta_seq_len, dim=48,
                                  n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=100))
        assert a.max_seq_len == max(seq_len, meta_seq_len)
        assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size) == (48, 3, 6, 3, 100)


@pytest.mark.parametrize("kw, message", [
    (dict(meta_read="before", meta_task="positions"), "meta_read 'before' reads SMLMT windows"),
    (dict(meta_read="before", meta_seq_len=1), "meta_read 'before' needs meta_seq_len of at least"),
    (dict(meta_features="standardize", inner_params="all"), "set inner_params='head'"),
    (dict(meta_head_rows="proto", head_grad="paper"), "'proto' needs head_grad='fomaml'")])
def test_well_posed_keys_refuse_what_they_cannot_do(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        common.check_config(cfg(tmp_path, **kw), 1)
    common.check_config(cfg(tmp_path, **{k: v for k, v in kw.items()
                                         if k not in ("meta_read", "meta_features",
                                                      "meta_head_rows")}), 1)
