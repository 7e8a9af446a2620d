"""Training: the one `fit` entry point, strategies, evaluators, paper 000's thin trainers."""

from tfmir.training.evaluation import embed_examples, evaluate_retrieval, recall_hits_per_source
from tfmir.training.fit import TrainingResult, fit, make_optimizer, make_sampler, read_log
from tfmir.training.strategy import STRATEGIES, make_strategy
from tfmir.training.trainer import SAMPLINGS, preset_config, train_embedder, train_universal

__all__ = ["SAMPLINGS", "STRATEGIES", "TrainingResult", "embed_examples", "evaluate_retrieval",
           "recall_hits_per_source",
           "fit", "make_optimizer", "make_sampler", "make_strategy", "preset_config", "read_log",
           "train_embedder", "train_universal"]
