"""The training verbs, side by side: pretrain, finetune full|lora (SFT), finetune classify|regress.

Each is a small method — its model, its batches, its loss, what it saves — run by the one training shell
(`lmforge.train.shell`) around the one loop (`lmforge.train.loop`).
"""
