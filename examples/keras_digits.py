"""Train a small Keras 3 network on scikit-learn's 8x8 digits on N Horovod workers (TensorFlow backend).

    hvdkit launch -np 2 examples/keras_digits.py --metrics-json results/keras_digits.json
    hvdkit launch --launcher mpirun -np 2 examples/keras_digits.py
    hvdkit launch -np 2 examples/keras_digits.py --input tfdata --mode loop
"""
from hvdkit import Trainer
from hvdkit.datasets import digits_split
from hvdkit.scripting import (MetricsFile, config_from_args, keras_learning_rate, main_guard, summary_line,
                               training_parser)


def make_model(keras):
    return keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])


@main_guard
def main():
    parser = training_parser(__doc__.splitlines()[0], epochs=20, batch_size=32, lr=0.05)
    parser.add_argument("--mode", choices=["fit", "loop"], default="fit",
                        help="fit: Keras model.fit; loop: hvdkit's GradientTape step in tf.function")
    parser.add_argument("--input", choices=["arrays", "tfdata"], default="arrays",
                        help="arrays: numpy arrays; tfdata: the same data as tf.data pipelines (hvdkit.keras.TFStream)")
    args = parser.parse_args()
    from hvdkit.keras import TFStream, make_adapter  # imports TensorFlow quietly
    import keras
    import tensorflow as tf
    x_train, y_train, x_test, y_test = digits_split()
    if args.limit_train is not None:
        x_train, y_train = x_train[:args.limit_train], y_train[:args.limit_train]
    train, test = (x_train, y_train), (x_test, y_test)
    if args.input == "tfdata":
        train = TFStream(tf.data.Dataset.from_tensor_slices(train), n=len(x_train))
        test = TFStream(tf.data.Dataset.from_tensor_slices(test), n=len(x_test))
    keras.utils.set_random_seed(args.seed)
    model = make_model(keras)
    optimizer = keras.optimizers.SGD(keras_learning_rate(args), momentum=0.9)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    adapter = make_adapter(model, optimizer, loss, mode=args.mode, compression=args.compression)
    metrics = MetricsFile(args.metrics_json, mode=args.mode, input=args.input)
    result = Trainer(adapter, config_from_args(args), [metrics]).fit(train, test)
    if result.rank == 0:
        print(summary_line(result), flush=True)


if __name__ == "__main__":
    main()
