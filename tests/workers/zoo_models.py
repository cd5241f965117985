"""The model zoo of tests/workers/zoo_checks.py, once per framework, with the plain-framework pieces the checks
need: the one-process reference step and readers that take every observed value from the framework itself
(parameters, BatchNorm statistics, optimizer state, dropout masks, checkpoint contents).

Models (the same architecture in torch and Keras):
  bn_cnn       conv 3x3 -> BatchNorm -> ReLU -> dense, on 8x8x1 digit images; SGD with momentum
  pool_cnn     conv 3x3 -> ReLU -> conv 3x3 -> ReLU -> max pool 2x2 -> dense, on the same images; Adam
  dropout_mlp  dense -> ReLU -> Dropout(0.5) -> dense; SGD with momentum
  mlp          dense -> tanh -> dense; Adam, AdamW (weight decay) or SGD with momentum
  token_model  tokens -> Embedding -> LayerNorm -> mean over the sequence -> dense (torch: optionally sparse)
  reg_mlp      (Keras) dense layers with an L2 kernel_regularizer; SGD with momentum

Every reader returns a list of (name, float64/int array); lists are compared by position (Keras names carry
per-model prefixes).
"""
from __future__ import annotations

import numpy as np

VOCAB, SEQ, EMB = 20, 5, 8


class TorchZoo:
    framework = "torch"

    def __init__(self):
        import torch
        from torch import nn
        from hvdkit.torch import TorchAdapter
        torch.set_num_threads(1)
        self.torch, self.nn, self.Adapter = torch, nn, TorchAdapter
        self.loss_fn = nn.functional.cross_entropy

        class TokenNet(nn.Module):
            def __init__(self, sparse):
                super().__init__()
                self.emb = nn.Embedding(VOCAB, EMB, sparse=sparse)
                self.norm = nn.LayerNorm(EMB)
                self.head = nn.Linear(EMB, 3)

            def forward(self, tokens):
                return self.head(self.norm(self.emb(tokens)).mean(dim=1))

        self.TokenNet = TokenNet

    # ---- data layout -------------------------------------------------------------------------
    def images(self, x):  # NHWC -> NCHW
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def tokens(self, x):
        return x.astype(np.int64)

    # ---- models ------------------------------------------------------------------------------
    def bn_cnn(self, seed):
        nn = self.nn
        self.torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 8 * 8, 10))
        return model, self.torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def pool_cnn(self, seed):
        nn = self.nn
        self.torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
        return model, self.torch.optim.Adam(model.parameters(), lr=0.01)

    def dropout_mlp(self, seed):
        nn = self.nn
        self.torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
        return model, self.torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def mlp(self, seed, optimizer, weight_decay=0.1):
        nn, optim = self.nn, self.torch.optim
        self.torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        if optimizer == "adam":
            opt = optim.Adam(model.parameters(), lr=0.01)
        elif optimizer == "adamw":
            opt = optim.AdamW(model.parameters(), lr=0.01, weight_decay=weight_decay)
        else:
            opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt

    def token_model(self, seed, sparse=False):
        self.torch.manual_seed(seed)
        model = self.TokenNet(sparse)
        return model, self.torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def adapter(self, model, opt, fit=False):
        return self.Adapter(model, opt, self.loss_fn)

    # ---- plain torch: one process, the reference -----------------------------------------------
    def reference_step(self, model, opt, step, x, y):
        """One optimizer step over the step's samples at one process (its mean loss)."""
        torch = self.torch
        model.train()
        opt.zero_grad()
        for ids in step.micro_batches:
            if len(ids):
                loss = self.loss_fn(model(torch.from_numpy(x[ids])), torch.from_numpy(y[ids]))
                (loss * len(ids) / step.samples_in_step).backward()
        opt.step()

    # ---- readers -----------------------------------------------------------------------------
    def params(self, model):
        return [(n, p.detach().numpy().astype(np.float64)) for n, p in model.named_parameters()]

    def stats(self, model):
        """BatchNorm running statistics (running_mean, running_var), read from the modules' buffers."""
        return [(n, b.detach().numpy().astype(np.float64)) for n, b in model.named_buffers()
                if n.endswith(("running_mean", "running_var"))]

    def batches_tracked(self, model):
        return [int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]

    def optimizer_state(self, opt, model):
        """exp_avg, exp_avg_sq and step of every parameter, from the optimizer that trained it."""
        out = []
        for name, p in model.named_parameters():
            state = opt.state[p]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                out.append((f"{name}/{key}", np.asarray(state[key].detach().numpy() if self.torch.is_tensor(state[key])
                                                         else state[key], dtype=np.float64)))
        return out

    def step_counts(self, opt, model):
        return [float(opt.state[p]["step"]) for p in model.parameters()]

    def dropout_mask(self, model):
        """One mask from the model's own Dropout module in training mode, drawn from this process' RNG."""
        drop = next(m for m in model.modules() if isinstance(m, self.nn.Dropout))
        model.train()
        with self.torch.no_grad():
            return (drop(self.torch.ones(64)) != 0).int().tolist()

    def evaluate(self, model, x, y):
        """(accuracy, mean loss) of the model in eval mode over all of x, in one process."""
        torch = self.torch
        model.eval()
        with torch.no_grad():
            out = model(torch.from_numpy(x))
            return float((out.argmax(1).numpy() == y).mean()), float(self.loss_fn(out, torch.from_numpy(y)))

    def checkpoint_stats(self, path, model):
        saved = self.torch.load(path, map_location="cpu", weights_only=True)["model"]
        return [(n, saved[n].numpy().astype(np.float64)) for n, _ in self.stats(model)]


class KerasZoo:
    framework = "tensorflow"

    def __init__(self, fit):
        import keras
        import tensorflow as tf
        from hvdkit.keras import KerasAdapter, KerasFitAdapter
        self.keras, self.tf, self.fit = keras, tf, fit
        self.Adapter, self.FitAdapter = KerasAdapter, KerasFitAdapter
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def images(self, x):
        return x

    def tokens(self, x):
        return x.astype(np.int32)

    # ---- models ------------------------------------------------------------------------------
    def bn_cnn(self, seed):
        keras, L = self.keras, self.keras.layers
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, padding="same"), L.BatchNormalization(),
                                  L.ReLU(), L.Flatten(), L.Dense(10)])
        return model, keras.optimizers.SGD(0.05, momentum=0.9)

    def pool_cnn(self, seed):
        keras, L = self.keras, self.keras.layers
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, padding="same", activation="relu"),
                                  L.Conv2D(8, 3, padding="same", activation="relu"), L.MaxPooling2D(), L.Flatten(),
                                  L.Dense(10)])
        return model, keras.optimizers.Adam(0.01)

    def bn_mlp(self, seed):
        """BatchNorm after a dense layer (no convolution)."""
        keras, L = self.keras, self.keras.layers
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((8, 8, 1)), L.Flatten(), L.Dense(16), L.BatchNormalization(), L.ReLU(),
                                  L.Dense(10)])
        return model, keras.optimizers.SGD(0.05, momentum=0.9)

    def dropout_mlp(self, seed):
        keras, L = self.keras, self.keras.layers
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((6,)), L.Dense(32, activation="relu"), L.Dropout(0.5), L.Dense(3)])
        return model, keras.optimizers.SGD(0.1, momentum=0.9)

    def mlp(self, seed, optimizer, weight_decay=0.1):
        keras, L = self.keras, self.keras.layers
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((6,)), L.Dense(16, activation="tanh"), L.Dense(3)])
        if optimizer == "adam":
            opt = keras.optimizers.Adam(0.01)
        elif optimizer == "adamw":
            opt = keras.optimizers.AdamW(0.01, weight_decay=weight_decay)
        else:
            opt = keras.optimizers.SGD(0.1, momentum=0.9)
        return model, opt

    def reg_mlp(self, seed, l2=0.01):
        keras, L = self.keras, self.keras.layers
        keras.utils.set_random_seed(seed)
        reg = (lambda: keras.regularizers.L2(l2)) if l2 else (lambda: None)
        model = keras.Sequential([keras.Input((6,)), L.Dense(16, activation="tanh", kernel_regularizer=reg()),
                                  L.Dense(3, kernel_regularizer=reg())])
        return model, keras.optimizers.SGD(0.1, momentum=0.9)

    def token_model(self, seed, sparse=False):
        keras, L = self.keras, self.keras.layers
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((SEQ,), dtype="int32"), L.Embedding(VOCAB, EMB), L.LayerNormalization(),
                                  L.GlobalAveragePooling1D(), L.Dense(3)])
        return model, keras.optimizers.SGD(0.1, momentum=0.9)

    def adapter(self, model, opt, fit=None):
        if self.fit if fit is None else fit:
            model.compile(optimizer=opt, loss=self.loss_fn)
            return self.FitAdapter(model)
        return self.Adapter(model, opt, self.loss_fn)

    # ---- plain Keras: one process, the reference -----------------------------------------------
    def reference_step(self, model, opt, step, x, y):
        """One optimizer step at one process: the step's mean loss plus the model's regularization losses once."""
        with self.tf.GradientTape() as tape:
            loss = 0.0
            for ids in step.micro_batches:
                if len(ids):
                    loss += self.loss_fn(y[ids], model(x[ids], training=True)) * (len(ids) / step.samples_in_step)
            if model.losses:
                loss += self.tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply(grads, model.trainable_variables)

    # ---- readers -----------------------------------------------------------------------------
    def params(self, model):
        return [(v.path, v.numpy().astype(np.float64)) for v in model.trainable_variables]

    def _stat_vars(self, model):
        return [v for v in model.variables if v.name in ("moving_mean", "moving_variance")]

    def stats(self, model):
        """BatchNormalization moving statistics, read from the layers' variables."""
        return [(v.path, v.numpy().astype(np.float64)) for v in self._stat_vars(model)]

    def batches_tracked(self, model):
        return []

    def optimizer_state(self, opt, model):
        """Every optimizer variable (iterations, learning rate, moments), in the optimizer's order."""
        return [(v.path, np.asarray(v.numpy(), dtype=np.float64)) for v in opt.variables]

    def step_counts(self, opt, model):
        return [float(opt.iterations.numpy())]

    def dropout_mask(self, model):
        """One mask from the model's own Dropout layer, called in training mode (its SeedGenerator advances)."""
        drop = next(layer for layer in model.layers if isinstance(layer, self.keras.layers.Dropout))
        out = drop(np.ones((1, 64), np.float32), training=True)
        return (np.asarray(out)[0] != 0).astype(int).tolist()

    def evaluate(self, model, x, y):
        out = model(x, training=False)
        return float((np.asarray(out).argmax(1) == y).mean()), float(self.loss_fn(y, out))

    def checkpoint_stats(self, path, model):
        saved = np.load(path, allow_pickle=False)
        index = {id(v): i for i, v in enumerate(model.variables)}
        return [(v.path, saved[f"model/{index[id(v)]}"].astype(np.float64)) for v in self._stat_vars(model)]


def zoo(backend: str):
    return TorchZoo() if backend == "torch" else KerasZoo(fit=backend == "keras-fit")
