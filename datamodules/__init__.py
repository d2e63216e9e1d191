"""LightningDataModules: streaming HF datasets, tokenizer, packing, rank/worker sharding, resumable state."""

from datamodules.pretrain import PretrainDataModule

__all__ = ["PretrainDataModule"]
