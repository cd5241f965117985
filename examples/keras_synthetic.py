"""Throughput of a small CNN (2 conv + 2 fc, 28x28 inputs) on synthetic data, Keras 3 on N workers.

    hvdkit launch -np 2 examples/keras_synthetic.py --metrics-json results/keras_synthetic.json
"""
from hvdkit import Trainer
from hvdkit.bench.models import keras_cnn  # the same CNN `hvdkit bench train` measures
from hvdkit.datasets import synthetic_images
from hvdkit.scripting import MetricsFile, config_from_args, keras_learning_rate, main_guard, training_parser


@main_guard
def main():
    parser = training_parser(__doc__.splitlines()[0], epochs=1, batch_size=64, lr=0.01)
    parser.add_argument("--samples", type=int, default=8192, help="synthetic training samples")
    parser.add_argument("--mode", choices=["fit", "loop"], default="fit")
    args = parser.parse_args()
    from hvdkit.keras import make_adapter, use_precision
    import keras
    x, y = synthetic_images(args.samples, seed=args.seed)
    x_test, y_test = synthetic_images(1024, seed=args.seed + 1)
    keras.utils.set_random_seed(args.seed)
    use_precision(args.precision)  # bf16: Keras' mixed_bfloat16 policy, set before the model is built
    model = keras_cnn(keras)
    optimizer = keras.optimizers.SGD(keras_learning_rate(args), momentum=0.9)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    adapter = make_adapter(model, optimizer, loss, mode=args.mode, compression=args.compression)
    metrics = MetricsFile(args.metrics_json, mode=args.mode, precision=args.precision)
    result = Trainer(adapter, config_from_args(args), [metrics]).fit((x, y), (x_test, y_test))
    if result.rank == 0:
        print(f"{result.samples_per_sec:.0f} samples/s on {result.world_size} workers ({args.mode})", flush=True)


if __name__ == "__main__":
    main()
