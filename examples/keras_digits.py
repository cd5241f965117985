"""Train a small Keras 3 network on the 8x8 digits (shipped in hvdkit) on N Horovod workers (TensorFlow backend).

    hvdkit launch -np 2 examples/keras_digits.py --metrics-json results/keras_digits.json
    hvdkit launch --launcher mpirun -np 2 examples/keras_digits.py
    hvdkit launch -np 2 examples/keras_digits.py --input tfdata --mode loop
"""
from hvdkit import Trainer
from hvdkit.datasets import digits_split
from hvdkit.scripting import (MetricsFile, config_from_args, keras_optimizer, main_guard, summary_line,
                               limit_train, optimizer_flag, training_parser)


def make_model(keras):
    # The logits in float32 under --precision bf16 too (Keras' mixed-precision advice): losses and metrics get
    # float32 outputs (the top-3 metric's in_top_k takes no bfloat16); with fp32 nothing changes.
    return keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, dtype="float32")])


@main_guard
def main():
    parser = training_parser(__doc__.splitlines()[0], epochs=20, batch_size=32, lr=0.05)
    parser.add_argument("--mode", choices=["fit", "loop"], default="fit",
                        help="fit: Keras model.fit; loop: hvdkit's GradientTape step in tf.function")
    parser.add_argument("--input", choices=["arrays", "tfdata"], default="arrays",
                        help="arrays: numpy arrays; tfdata: the same data as tf.data pipelines (hvdkit.keras.TFStream)")
    optimizer_flag(parser)
    args = parser.parse_args()
    from hvdkit.keras import TFStream, make_adapter, use_precision  # imports TensorFlow quietly
    import keras
    import tensorflow as tf
    x_train, y_train, x_test, y_test = digits_split()
    x_train, y_train = limit_train(args, x_train, y_train)   # --limit-train, checked
    train, test = (x_train, y_train), (x_test, y_test)
    if args.input == "tfdata":
        train = TFStream(tf.data.Dataset.from_tensor_slices(train), n=len(x_train))
        test = TFStream(tf.data.Dataset.from_tensor_slices(test), n=len(x_test))
    keras.utils.set_random_seed(args.seed)
    use_precision(args.precision)  # bf16: Keras' mixed_bfloat16 policy, set before the model is built
    model = make_model(keras)
    optimizer = keras_optimizer(args)   # --optimizer: SGD with momentum by default
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    top3 = keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3")  # reported as eval_top3, exact
    adapter = make_adapter(model, optimizer, loss, mode=args.mode, compression=args.compression, metrics=[top3])
    metrics = MetricsFile(args.metrics_json, mode=args.mode, input=args.input, precision=args.precision)
    result = Trainer(adapter, config_from_args(args), [metrics]).fit(train, test)
    if result.rank == 0:
        print(summary_line(result), flush=True)


if __name__ == "__main__":
    main()
