"""The anchor of `deckhand bench recognizer`: onnxruntime on the same model and photos.

Run by the bench as `python3 onnxruntime_anchor.py MODEL RUNS THREADS... -- JPEG...`. For each thread
count it opens one session (all graph optimisations, intra-op threads as given, sequential execution),
then times `RUNS` passes over the photos of: decode (Pillow), resize to 224x224 (bilinear) and normalise
with ImageNet's mean and std to NCHW float32 (numpy), and the model's run. It prints one JSON line per
thread count: {"threads", "version", "decode_ms", "infer_ms", "total_ms"}, medians per image.

When onnxruntime, numpy or Pillow cannot be imported it prints {"missing": "..."} and exits 0: the bench
says so and goes on.
"""

import io
import json
import statistics
import sys
import time

try:
    import numpy as np
    import onnxruntime as ort
    from PIL import Image
except ImportError as e:  # the bench reports it
    print(json.dumps({"missing": str(e)}))
    sys.exit(0)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def tensor(jpeg: bytes, side: int) -> np.ndarray:
    img = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((side, side), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return ((x - MEAN) / STD)[None]


def main() -> None:
    sep = sys.argv.index("--")
    model, runs, threads = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3:sep]]
    photos = [open(p, "rb").read() for p in sys.argv[sep + 1 :]]
    for n in threads:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = n
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        side = 224
        for jpeg in photos[:3]:  # warm up
            session.run(None, {name: tensor(jpeg, side)})
        decode, infer, total = [], [], []
        for r in range(runs):
            jpeg = photos[r % len(photos)]
            t0 = time.perf_counter()
            x = tensor(jpeg, side)
            t1 = time.perf_counter()
            session.run(None, {name: x})
            t2 = time.perf_counter()
            decode.append(t1 - t0)
            infer.append(t2 - t1)
            total.append(t2 - t0)
        print(
            json.dumps(
                {
                    "threads": n,
                    "version": ort.__version__,
                    "decode_ms": statistics.median(decode) * 1e3,
                    "infer_ms": statistics.median(infer) * 1e3,
                    "total_ms": statistics.median(total) * 1e3,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
