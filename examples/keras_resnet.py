"""Train a small Keras 3 ResNet (BatchNorm, residual blocks, dropout, AdamW) on 8x8 digits on N Horovod workers.

    hvdkit launch -np 2 examples/keras_resnet.py --metrics-json results/keras_resnet.json
    hvdkit launch -np 2 examples/keras_resnet.py --mode loop --sync-batchnorm
    hvdkit launch --launcher mpirun -np 2 examples/keras_resnet.py

Without --sync-batchnorm each rank normalises by its own batch (hvdkit averages the moving statistics over
ranks); with it the batch statistics are computed over all ranks' samples of the step.
"""
from hvdkit import Trainer
from hvdkit.datasets import digits_split
from hvdkit.scripting import (MetricsFile, config_from_args, keras_learning_rate, main_guard, summary_line,
                               limit_train, training_parser)

# The same network, recipe and defaults as examples/torch_resnet.py.
EPOCHS, BATCH_SIZE, LR, WEIGHT_DECAY, CHANNELS = 10, 32, 3e-4, 1e-2, 32


def make_model(keras, channels: int = CHANNELS, dropout: float = 0.2):
    layers = keras.layers

    def conv_bn(x):
        # momentum 0.9 (torch's 0.1): Keras' default 0.99 lags behind a run this short
        x = layers.Conv2D(channels, 3, padding="same", use_bias=False)(x)
        return layers.BatchNormalization(momentum=0.9)(x)

    def block(x):
        # conv-BN-ReLU-conv-BN plus the identity, then ReLU (a ResNet basic block, same width and size)
        y = conv_bn(layers.ReLU()(conv_bn(x)))
        return layers.ReLU()(layers.Add()([x, y]))

    # input (N, 8, 8, 1) -> stem -> 2 residual blocks at 8x8 -> global average pool -> dropout -> 10 logits
    inputs = keras.Input(shape=(8, 8, 1))
    x = block(block(layers.ReLU()(conv_bn(inputs))))
    x = layers.Dropout(dropout)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, layers.Dense(10)(x))


@main_guard
def main():
    parser = training_parser(__doc__.splitlines()[0], epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR)
    parser.add_argument("--mode", choices=["fit", "loop"], default="fit",
                        help="fit: Keras model.fit; loop: hvdkit's GradientTape step in tf.function")
    args = parser.parse_args()
    from hvdkit.keras import make_adapter, use_precision  # imports TensorFlow quietly
    import keras
    x_train, y_train, x_test, y_test = digits_split(images=True)   # NHWC images
    x_train, y_train = limit_train(args, x_train, y_train)   # --limit-train, checked
    keras.utils.set_random_seed(args.seed)
    use_precision(args.precision)  # bf16: Keras' mixed_bfloat16 policy, set before the model is built
    model = make_model(keras)
    optimizer = keras.optimizers.AdamW(keras_learning_rate(args), weight_decay=WEIGHT_DECAY)
    # No weight decay on BatchNorm scales/shifts and biases (the usual ResNet recipe).
    optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    adapter = make_adapter(model, optimizer, loss, mode=args.mode, compression=args.compression)
    metrics = MetricsFile(args.metrics_json, mode=args.mode, sync_batchnorm=args.sync_batchnorm,
                          precision=args.precision)
    result = Trainer(adapter, config_from_args(args), [metrics]).fit((x_train, y_train), (x_test, y_test))
    if result.rank == 0:
        print(summary_line(result), flush=True)


if __name__ == "__main__":
    main()
