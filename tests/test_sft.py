"""`lockstep sft`: CLI wiring, config errors that name the field, and a short run on the
synthetic arithmetic task that lowers the held-out loss and writes its outputs."""
import json

import pytest
import torch
import yaml

from tests_paths import ROOT, TINY


def test_sft_subcommand_is_registered():
    from rl.cli import build_parser
    args = build_parser("sft").parse_args(["sft", "--config", "x.yaml", "steps=3", "trainer.lr=0.1"])
    assert callable(args.func) and args.overrides == ["steps=3", "trainer.lr=0.1"]


def test_sft_config_errors_name_the_field(tmp_path):
    from trainer.sft_cli import load_config
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "model": str(TINY), "trainer": {"zero_stage": 4}}))
    with pytest.raises(ValueError, match="zero_stage"):
        load_config(str(path))
    with pytest.raises(ValueError, match="batch_sise"):
        load_config(str(path), ["trainer.zero_stage=2", "batch_sise=3"])
    cfg = load_config(str(ROOT / "configs" / "sft_arith_tiny.yaml"), ["steps=7", "trainer.lr=0.01"])
    assert cfg.steps == 7 and cfg.trainer.lr == 0.01


def test_encode_masks_only_the_response():
    from rl.model.tokenizer import build_char_tokenizer
    from trainer.sft import collate, encode
    tok = build_char_tokenizer(128)
    ids, prompt_len = encode(tok, "12+7=", "19", add_bos=False)
    assert tok.decode(ids[:prompt_len]) == "12+7=" and ids[-1] == tok.eos_token_id and len(ids) == 8
    batch = collate([(ids, prompt_len), encode(tok, "1+1=", "2", add_bos=True)], tok.pad_token_id)
    assert batch["response_mask"][0].tolist() == [0] * 5 + [1] * 3
    assert batch["response_mask"][1].tolist() == [0] * 5 + [1] * 2 + [0]
    assert batch["lengths"].tolist() == [8, 7]


@pytest.mark.slow
def test_sft_run_lowers_heldout_loss(tmp_path):
    from transformers import AutoTokenizer

    from rl.model.checkpoint import load_model
    from trainer.sft import run_sft
    from trainer.sft_cli import load_config
    previous = torch.get_num_threads()
    cfg = load_config(str(ROOT / "configs" / "sft_arith_tiny.yaml"),
                      [f"out_dir={tmp_path}", "name=t", "steps=40", "batch_size=32", "eval_every=40",
                       "log_every=10", "data.num_eval=50", "trainer.micro_batch_size=16",
                       "trainer.total_steps=40", "trainer.warmup_steps=4"])
    try:
        summary = run_sft(cfg, log=lambda line: None)
    finally:
        torch.set_num_threads(previous)
    assert summary["eval_loss_after"] < 0.6 * summary["eval_loss_before"], summary
    lines = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [x["loss"] for x in lines if "loss" in x]
    assert len(train_losses) == 4 and train_losses[-1] < train_losses[0]
    assert [x["step"] for x in lines if "exact_match" in x] == [0, 40]
    checkpoint = tmp_path / "t" / "checkpoint"
    model = load_model(checkpoint)                      # an HF directory the RL run starts from
    assert AutoTokenizer.from_pretrained(checkpoint).eos_token == "<eos>"
    assert model.config.vocab_size == 128
