"""One worker of a 2-process MultiWorkerMirroredStrategy test run (tests/test_distribute.py).

    TF_CONFIG='{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}' \
    python tests/multiworker_worker.py MODEL_DIR CACHE_DIR OUT.npz

Trains tiny_cnn through the real Trainer with --strategy=multi_worker, then
writes this worker's final weights (by state key), its worker_info and the
strategy's cluster_resolver view to OUT.npz, so the test can compare workers.
The strategy must be the first TensorFlow thing the process does, so nothing
here touches TF before Trainer(config).
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(model_dir, cache_dir, out):
    import numpy as np

    from engine.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig
    from engine.trainer import Trainer

    config = Config(
        # sync_bn: Keras BN moving statistics have aggregation "none", so without
        # it each worker keeps its own (the trainable weights agree either way).
        model=ModelConfig(backbone="tiny_cnn", input_size=32, sync_bn=True),
        data=DataConfig(cache_dir=cache_dir),
        optimizer=OptimizerConfig(name="momentum", learning_rate=0.05, schedule="constant",
                                  global_clipnorm=1.0),
        train=TrainConfig(model_dir=model_dir, epochs=1, batch_size=32, steps_per_epoch=3,
                          steps_per_loop=2, checkpoint_every_steps=2, strategy="multi_worker", ema_decay=0.9,
                          eval_with_ema=False,
                          progress=False))
    trainer = Trainer(config)
    result = trainer.train()
    resolver = trainer.parts.strategy.cluster_resolver
    values = {f"state/{k}": v for k, v in trainer.parts.state.values().items()}
    p = trainer.parts
    info = {"worker_info": [p.num_workers, p.worker_index, p.is_chief],
            "task_type": resolver.task_type, "task_id": resolver.task_id,
            "cluster": resolver.cluster_spec().as_dict(),
            "replicas": trainer.parts.strategy.num_replicas_in_sync,
            "local_replicas": trainer.parts.local_replicas,
            "loss": result.get("loss")}
    np.savez(out, info=json.dumps(info), **values)


if __name__ == "__main__":
    main(*sys.argv[1:4])
