"""`lmforge models`: the built-in presets with their sizes."""

from __future__ import annotations

import torch

from lmforge.config import PRESETS, preset
from lmforge.model.gpt import GPT
from lmforge.model.lstm import LSTM_PRESETS, LSTMLM, lstm_preset
from lmforge.model.seq2seq import SEQ2SEQ_PRESETS, Seq2Seq, seq2seq_preset


def models() -> str:
    """List the built-in model presets with their sizes."""
    rows = ["preset                family  layers  width  heads  kv  context  params"]
    for name in PRESETS:
        c = preset(name)
        with torch.device("meta"):
            n = GPT(c).num_params()
        rows.append(f"{name:<21} {c.family:<7} {c.num_hidden_layers:>6} {c.hidden_size:>6} "
                    f"{c.num_attention_heads:>6} {c.num_key_value_heads:>3} {c.max_position_embeddings:>8} "
                    f"{n / 1e6:>6.1f}M")
    rows += ["", "encoder-decoder       enc/dec  width  heads  positions   params (at vocab 16000)"]
    for name in SEQ2SEQ_PRESETS:
        c = seq2seq_preset(name, vocab_size=16000)
        with torch.device("meta"):
            n = Seq2Seq(c).num_params()
        rows.append(f"{name:<21} {c.n_encoder_layers:>3}/{c.n_decoder_layers:<3} {c.d_model:>6} {c.n_heads:>6}  "
                    f"{c.position:<10} {n / 1e6:>6.1f}M")
    rows += ["", "baselines             layers  width  params (at vocab 8192)"]
    for name in LSTM_PRESETS:
        c = lstm_preset(name)
        with torch.device("meta"):
            n = LSTMLM(c).num_params()
        rows.append(f"{name:<21} {c.num_hidden_layers:>6} {c.hidden_size:>6}  {n / 1e6:.1f}M (LSTM, tied embedding)")
    rows.append("ngram-N (N = 1..9)    interpolated modified Kneser-Ney over token ids, counted in one pass")
    return "\n".join(rows)
