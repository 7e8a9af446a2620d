"""Training: strategy, callbacks, the embedder and universal-model trainers, per-source evaluation."""

from tfmir.training.callbacks import RetrievalEvaluation
from tfmir.training.distillation import train_universal
from tfmir.training.evaluation import embed_examples, evaluate_retrieval
from tfmir.training.strategy import STRATEGIES, make_strategy
from tfmir.training.trainer import SAMPLINGS, TrainingResult, make_sampler, read_log, train_embedder

__all__ = ["RetrievalEvaluation", "SAMPLINGS", "STRATEGIES", "TrainingResult", "embed_examples",
           "evaluate_retrieval", "make_sampler", "make_strategy", "read_log", "train_embedder",
           "train_universal"]
