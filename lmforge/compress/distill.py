"""`lmforge compress distill`: train a small student on a large teacher's softened next-token distribution.

A method of the one training shell like pretraining: the same windows of a packed dataset, the same loop;
only the loss differs (`train.losses.distillation_loss`, Hinton et al. 2015), with the frozen teacher's
logits computed on the fly for each batch. Teacher and student must share a tokenizer: a KL between two
distributions needs the same token at the same index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.checkpoint import (
    build_model,
    load_decoder,
    load_weights,
    read_config,
    resolve_model_config,
    save_checkpoint,
)
from lmforge.data.pack import PackedDataset
from lmforge.errors import ConfigError
from lmforge.methods.pretrain import _val_loader
from lmforge.tokenizer import Tokenizer
from lmforge.train.loaders import WindowLoader
from lmforge.train.losses import distill_loss
from lmforge.train.shell import Context, Method, training_verb


def require_same_vocabulary(a: Path, b: Path, a_name: str, b_name: str) -> None:
    """Refuse two tokenizers (directories holding tokenizer.json) that map any token to a different id."""
    va = Tokenizer.load(a).hf.get_vocab(with_added_tokens=True)
    vb = Tokenizer.load(b).hf.get_vocab(with_added_tokens=True)
    if va != vb:
        differ = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(f"{a_name} {a} and {b_name} {b} have different vocabularies ({len(va)} vs {len(vb)} "
                          f"tokens; e.g. {differ}); distillation compares their distributions token by token, "
                          "so they must share one tokenizer")


@training_verb("compress distill", default_epochs=None, out=Path("runs/student"))
def distill(
    ctx: Context,
    teacher: Path | None = None,
    student: str | None = None,
    data: Path | None = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    kl: Literal["forward", "reverse"] = "forward",
    block_size: int | None = None,
) -> Method:
    """Train a student model to match a teacher's softened next-token distributions (knowledge distillation).

    The loss per token is α·T²·KL(p_teacher ‖ p_student) + (1 − α)·cross-entropy, with p = softmax(logits / T)
    (Hinton et al. 2015). The teacher runs frozen on the same windows; the validation loss is this loss too.

    Args:
        teacher: Checkpoint directory of the teacher (ours or a Hugging Face decoder).
        student: A preset name (built with the teacher's vocabulary) or a checkpoint directory to start from.
        data: Directory written by `lmforge data pack` with the teacher's tokenizer.
        temperature: T: softens both distributions (1 = as they are).
        alpha: Weight of the distillation term; 1 − alpha weighs cross-entropy on the data's next tokens.
        kl: "forward" = KL(teacher ‖ student), mass-covering; "reverse" = KL(student ‖ teacher), mode-seeking.
        block_size: Tokens per window (default: the shorter context of teacher and student).

    Returns:
        The student's checkpoint directory.
    """
    if teacher is None or student is None or data is None:
        raise ConfigError("--teacher, --student and --data are required")
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise ConfigError(f"--temperature {temperature} must be > 0 and --alpha {alpha} within [0, 1]")
    data, tokenizer_dir = Path(data), Path(data) / "tokenizer"
    teacher_loaded = load_decoder(Path(teacher), dtype=torch.float32)
    require_same_vocabulary(Path(teacher), tokenizer_dir, "--teacher", "--data's tokenizer")
    vocab = teacher_loaded.config.vocab_size
    if ctx.resume is not None:
        config = read_config(ctx.resume)
        net = build_model(config)
        load_weights(net, ctx.resume)
    elif Path(student).is_dir():
        require_same_vocabulary(Path(student), Path(teacher), "--student", "--teacher")
        loaded = load_decoder(Path(student), dtype=torch.float32)
        net, config = loaded.model.train(), loaded.config
    else:
        config = resolve_model_config(student, vocab_size=vocab)
        net = build_model(config)
    if config.vocab_size != vocab:
        raise ConfigError(f"--student {student}: vocab_size={config.vocab_size}, the teacher's is {vocab}; "
                          "their logits must cover the same tokens")
    context = min(config.max_position_embeddings, teacher_loaded.config.max_position_embeddings)
    block_size = block_size or context
    if block_size > context:
        raise ConfigError(f"block_size={block_size} exceeds the shorter context of teacher and student ({context})")
    cfg, dist = ctx.cfg, ctx.dist
    frozen = teacher_loaded.model.to(dist.device).eval().requires_grad_(False)
    loader = WindowLoader(PackedDataset(data, "train"), block_size, cfg.batch_size, rank=dist.rank,
                          world_size=dist.world_size, seed=cfg.seed)

    def save(out: Path, train_state: dict[str, Any] | None, step: int) -> None:
        save_checkpoint(out, net, config, tokenizer_dir=tokenizer_dir,
                        generation_config=teacher_loaded.generation_config, train_state=train_state, step=step)

    n_student = sum(p.numel() for p in net.parameters())
    n_teacher = sum(p.numel() for p in frozen.parameters())
    summary = (f"distilling {teacher} ({n_teacher / 1e6:.2f}M parameters) into a {n_student / 1e6:.2f}M-parameter "
               f"student: T={temperature:g}, alpha={alpha:g}, {kl} KL; data: {loader.dataset.num_tokens:,} tokens")
    return Method(net, loader, distill_loss(frozen, temperature=temperature, alpha=alpha, reverse=kl == "reverse"),
                  save, val_loader=_val_loader(data, block_size, cfg.batch_size, dist.rank, dist.world_size),
                  summary=summary)
