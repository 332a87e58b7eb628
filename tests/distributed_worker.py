"""HRP across the switch under TF MirroredStrategy and torch DDP.

Each needs a fresh process (TensorFlow's logical devices, torch's process
group), so the tests run this module:

    KERAS_BACKEND=tensorflow python -m tests.distributed_worker mirrored OUT_DIR
    KERAS_BACKEND=torch python -m tests.distributed_worker ddp OUT_DIR
"""

import json
import os
import sys

import numpy as np

STEPS = 4


def mirrored(out_dir):
    """fit across the switch with 2 mirrored logical CPUs; reports variable kinds."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    import keras_hrp
    from keras_hrp import lora
    from tests.helpers import hrp_mlp
    from tests.helpers import regression_data

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = regression_data(n=128)
    with strategy.scope():
        model = hrp_mlp()
        model.compile(keras.optimizers.Adam(0.01), "mse")
    hrp = keras_hrp.HRPCallback(STEPS, verbose=0)
    history = model.fit(x, y, batch_size=32, epochs=4, callbacks=[hrp], verbose=0)

    def kind(variable):
        return type(getattr(variable, "value", variable)).__name__

    adapters = [v for layer in keras_hrp.hrp_layers(model) for v in lora.lora_factors(layer)]
    slots = [v for v in model.optimizer.variables if "lora_kernel" in v.name or "lora_kernel" in v.path]
    report = {
        "replicas": strategy.num_replicas_in_sync,
        "switch_step": hrp.switch_step,
        "ranks": [layer.lora_rank for layer in keras_hrp.hrp_layers(model)],
        "adapters": sorted({kind(v) for v in adapters}),
        "slots": sorted({kind(v) for v in slots}),
        "slot_count": len(slots),
        "loss": history.history["loss"],
        "b_max": float(max(np.abs(keras.ops.convert_to_numpy(lora.lora_factors(l)[1])).max()
                           for l in keras_hrp.hrp_layers(model))),
    }
    with open(os.path.join(out_dir, "mirrored.json"), "w") as stream:
        json.dump(report, stream)


def _ddp_process(rank, world, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["DDP_PORT"])
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    import keras

    import keras_hrp
    from keras_hrp import lora
    from tests.helpers import hrp_mlp
    from tests.helpers import regression_data

    keras.utils.set_random_seed(0)  # the same initial model on every process
    model = hrp_mlp()
    x, y = regression_data(n=64 * world, seed=0)
    x, y = torch.tensor(x[rank::world]), torch.tensor(y[rank::world])  # one shard each

    def train(steps):
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        for step in range(steps):
            batch = slice(16 * (step % 4), 16 * (step % 4 + 1))
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x[batch]), y[batch])
            loss.backward()
            optimizer.step()

    snapshot = keras_hrp.WeightSnapshot(model)
    train(STEPS)
    report = keras_hrp.switch_to_main(model, snapshot)
    switched = {
        layer.path: [keras.ops.convert_to_numpy(v) for v in lora.lora_factors(layer)]
        for layer in keras_hrp.hrp_layers(model)
    }
    train(STEPS)  # re-wrapped: DDP sees the new rank-r adapters
    arrays = {}
    for layer in keras_hrp.hrp_layers(model):
        a, b = (keras.ops.convert_to_numpy(v) for v in lora.lora_factors(layer))
        arrays[f"{layer.path}.switched_A"] = switched[layer.path][0]
        arrays[f"{layer.path}.A"], arrays[f"{layer.path}.B"] = a, b
    arrays["fallbacks"] = np.array(len(report.fallbacks))
    np.savez(os.path.join(out_dir, f"ddp_rank{rank}.npz"), **arrays)
    dist.destroy_process_group()


def ddp(out_dir, world=2):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        os.environ["DDP_PORT"] = str(probe.getsockname()[1])
    mp.spawn(_ddp_process, args=(world, out_dir), nprocs=world, join=True)


if __name__ == "__main__":
    {"mirrored": mirrored, "ddp": ddp}[sys.argv[1]](sys.argv[2])
