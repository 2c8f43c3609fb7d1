"""Train the embedded ``tiny`` Qwen3-VL on synthetic visual question answering.

    python scripts/train_tiny.py --out qwen3vl_compile/assets/tiny_trained.safetensors

The model is the ``tiny-random`` architecture (real token ids and vocabulary, DeepStack at
vision blocks 1, 3, 4, interleaved MRoPE, GQA) started from the preset's own seeded init at
std 0.02, and trained with Hugging Face's ``Qwen3VLForConditionalGeneration`` in fp32 on
items from ``qwen3vl_compile.presets.shapes`` (colours, shapes, counting, relative position,
digits, two-image comparison), prompts built exactly as the runtime builds them.

Only what training changed is written: every tensor except the token embedding, plus the
embedding rows of the tokens the training prompts and answers use (the other rows get no
gradient and no weight decay, so they stay as the seed makes them). The preset rebuilds the
rest from the seed. Deterministic for a given torch version and thread count: fixed seeds,
fixed data order.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qwen3vl_compile.presets.configs import preset_config
from qwen3vl_compile.presets.materialize import PREPROCESSOR_CONFIG, TINY_SEED, build_random_model, write_tokenizer_files
from qwen3vl_compile.presets.shapes import KINDS, TRAIN_SIZES, items
from qwen3vl_compile.runtime.chat import ChatFormatter
from qwen3vl_compile.runtime.preprocess import ProcessorConfig, preprocess

TRAIN_SEED = 7
EMBED_KEY = "model.language_model.embed_tokens.weight"
IGNORE = -100


def encode_item(chat: ChatFormatter, cfg: ProcessorConfig, item) -> dict:
    processed = [preprocess(img, cfg) for img in item.images]
    prompt = chat.encode(item.prompt, [p.num_tokens for p in processed])[0]
    answer = chat.tokenizer.encode(item.answer, add_special_tokens=False).ids + [chat.tokenizer.token_to_id("<|im_end|>")]
    ids = np.concatenate([prompt, np.asarray(answer, np.int64)])
    labels = np.full_like(ids, IGNORE)
    labels[len(prompt):] = ids[len(prompt):]
    return {"ids": ids, "labels": labels, "pixels": np.concatenate([p.pixel_values for p in processed]),
            "grids": [list(p.grid_thw) for p in processed]}


def collate(batch: list[dict], pad_id: int, image_id: int) -> dict:
    n = max(len(b["ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["ids"])
        ids[i, :k] = torch.from_numpy(b["ids"])
        labels[i, :k] = torch.from_numpy(b["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "mm_token_type_ids": (ids == image_id).long(),
            "pixel_values": torch.from_numpy(np.concatenate([b["pixels"] for b in batch])),
            "image_grid_thw": torch.tensor([g for b in batch for g in b["grids"]])}


def loss_on_answers(model, batch: dict) -> torch.Tensor:
    """Cross-entropy on the answer tokens only; logits are computed for those positions
    alone (a full [B, S, vocab] tensor would be most of the step's memory)."""
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                      mm_token_type_ids=batch["mm_token_type_ids"])
    hidden = out.last_hidden_state[:, :-1]
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    logits = model.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits, target[keep])


def trained_rows(chat: ChatFormatter, cfg: ProcessorConfig, n: int = 600) -> list[int]:
    """Token ids of everything training feeds or predicts (prompts, answers, template),
    except the image pads (their rows are replaced by vision features)."""
    seen: set[int] = set()
    for item in items(TRAIN_SEED + 1000, n, TRAIN_SIZES):
        e = encode_item(chat, cfg, item)
        seen.update(int(t) for t in e["ids"])
    seen.discard(chat.image_pad_id)
    return sorted(seen)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/qwen3vl-train-tiny"), help="scratch directory (tokenizer)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(TRAIN_SEED)

    args.work.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(args.work)
    chat = ChatFormatter(args.work)
    cfg = ProcessorConfig.from_dict(PREPROCESSOR_CONFIG)
    pad_id = chat.tokenizer.token_to_id("<|endoftext|>")

    model = build_random_model(preset_config("tiny"), TINY_SEED)
    model.train()
    rows = trained_rows(chat, cfg)
    embed = model.get_input_embeddings().weight
    row_mask = torch.zeros(embed.shape[0], 1)
    row_mask[rows] = 1.0
    embed.register_hook(lambda g: g * row_mask)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p is not embed]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0},
                             {"params": [embed], "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    stream = items(TRAIN_SEED, args.steps * args.batch, TRAIN_SIZES)
    t0, running = time.perf_counter(), None
    for step in range(args.steps):
        batch = collate([encode_item(chat, cfg, next(stream)) for _ in range(args.batch)], pad_id, chat.image_pad_id)
        loss = loss_on_answers(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.0f} s",
                  flush=True)

    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if k != EMBED_KEY and k != "lm_head.weight"}
    state["embed_rows.index"] = torch.tensor(rows, dtype=torch.int64)
    state["embed_rows.weight"] = embed.detach()[rows].to(torch.bfloat16).contiguous()
    meta = {"format": "pt", "preset": "tiny", "base_seed": str(TINY_SEED), "train_seed": str(TRAIN_SEED),
            "steps": str(args.steps), "batch": str(args.batch), "lr": str(args.lr), "kinds": ",".join(KINDS),
            "final_loss": f"{running:.4f}", "seconds": f"{time.perf_counter() - t0:.0f}",
            "torch": torch.__version__, "command": " ".join(["python scripts/train_tiny.py", *(argv or sys.argv[1:])])}
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=meta)
    args.out.chmod(0o644)
    print(json.dumps({"wrote": str(args.out), "bytes": args.out.stat().st_size, **meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
