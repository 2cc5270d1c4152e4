"""The serving path's fast tower calls: the same numbers as the eager towers, less CPU time (issue 12).

    predictor = Predictor(model, fast=True)     # mmgcs.inference: the image tower runs through a FastPath

`FastPath(model).encode_image(pixels)` runs the image tower through its fast encoder (`tower.fast_encoder`:
static SAME padding, BatchNorm folded by TorchScript freezing, oneDNN fusion; mmgcs.models.image_fast), built on
the first batch of each poster size and checked there against the eager tower. `encode_text(ids, mask)` runs the
text tower exported to ONNX (dynamic batch and sequence axes) in ONNX Runtime (the optional extra `mmgcs[fast]`),
whose fused attention and MLAS kernels take a ~60-token MiniLM call from ~17 to ~8 ms on one thread; it is
checked against the eager tower on the first batch and on that batch padded longer (so no shape is baked in).
Where no fast encoder applies (GPU, an untraceable tower, onnxruntime not installed) or building one fails, the
eager tower runs and the server log gets one line saying why: a missing backend is never an error for the user.

The encoder is a snapshot of the tower's weights when it is built: use a FastPath only over a frozen model
(serving, evaluation), never one that is still being trained.

ONNX Runtime's telemetry stays off: it is loaded only through `import_onnxruntime` (issue 18).

Measured and not kept (benchmarks/bench_predict.py, issue 12): torch.compile of the text tower (31 s to build,
no faster at batch 1), TorchScript freezing of it (~5 %). Tokenization already pads a batch to its longest plot.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import warnings
from typing import Any, Mapping, Optional

import torch

from mmgcs.models.tower import outputs_agree
from mmgcs.runtime import release_freed_memory

logger = logging.getLogger(__name__)

# The fast encoder's features may differ from eager ones by float rounding only; checked on the first batch
# (relative to its largest feature), as FastImageEncoder does, but 10x tighter: scores must stay within 1e-4.
FEATURE_RTOL = 1e-4


def fast_path_setting(environ: Optional[Mapping[str, str]] = None) -> bool:
    """`MMGCS_FAST_PATH`: 1 (default) runs frozen towers through the fast calls (serving fp32, featurization for
    the feature cache), 0 through the eager ones; any other value is a ValueError naming the choices."""
    environ = os.environ if environ is None else environ
    raw = environ.get("MMGCS_FAST_PATH", "1").strip().lower() or "1"
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"MMGCS_FAST_PATH={raw!r}: use 1 (the fast path, default) or 0 (the eager towers).")
    return raw in ("1", "true", "yes")


class FastPath:
    """A model's fast tower calls for frozen inference; each falls back to the eager tower (logged once)."""

    def __init__(self, model, enabled: bool = True, release_eager_text: bool = False):
        self.model = model
        self.enabled = enabled
        # Serving only: once the ONNX Runtime encoder is checked, the eager text tower's weights are a second copy
        # of what ONNX Runtime holds (90 MB for MiniLM, 438 MB for mpnet); the model's text tower becomes the
        # encoder (OnnxTextTower), so every caller of model.encode_text gets the same scores without them.
        self.release_eager_text = release_eager_text
        self._image: dict[tuple, Optional[Any]] = {}  # poster tensor shape (C, H, W) -> fast encoder or None (eager)
        self._text: list = []  # [] until built, then [the ONNX Runtime encoder or None (eager)]
        self._lock = threading.Lock()

    def text_kind(self) -> str:
        return "onnxruntime" if self._text and self._text[0] is not None else "eager"

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.enabled and not self._text:
            with self._lock:
                if not self._text:
                    self._text.append(_build_text(self.model, input_ids, attention_mask))
                    if self._text[0] is not None and self.release_eager_text:
                        self._release_eager_text(self._text[0])
        encoder = self._text[0] if self.enabled else None
        if encoder is None:
            return self.model.encode_text(input_ids, attention_mask)
        return encoder(input_ids, attention_mask)

    def _release_eager_text(self, encoder: "OnnxTextEncoder") -> None:
        self.model.text_tower = OnnxTextTower(encoder, self.model.text_tower.out_dim)
        release_freed_memory()
        logger.info("The text tower now runs in ONNX Runtime only; its eager weights were released")

    def image_kind(self) -> str:
        """What runs the image tower: the fast encoder's kind once one is in use, else "eager"."""
        kinds = {getattr(e, "kind", "eager") for e in self._image.values() if e is not None}
        return kinds.pop() if len(kinds) == 1 else "eager"

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        encoder = self._image_encoder(pixels) if self.enabled else None
        if encoder is None:
            if pixels.device.type == "cpu":
                # channels-last input runs CPU convolutions ~10-25 % faster (same numbers to ~1e-6)
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            return self.model.encode_image(pixels)
        return encoder(pixels)

    def _image_encoder(self, pixels: torch.Tensor) -> Optional[Any]:
        key = tuple(pixels.shape[1:])
        if key not in self._image:
            with self._lock:
                if key not in self._image:
                    self._image[key] = self._build_image(pixels)
        return self._image[key]

    def _build_image(self, sample: torch.Tensor) -> Optional[Any]:
        tower = self.model.image_tower
        build = getattr(tower, "fast_encoder", None)
        if build is None or sample.device.type != "cpu":
            logger.info("No fast image encoder for %s on %s; the eager tower serves", type(tower).__name__,
                        sample.device.type)
            return None
        try:
            encoder = build(sample)
            if encoder is not None and not _agrees(encoder, self.model, sample):
                logger.info("The fast image encoder disagrees with the eager tower beyond %g; the eager tower serves",
                            FEATURE_RTOL)
                encoder = None
        except Exception as e:  # noqa: BLE001 — any failure of an optional backend means: run eagerly
            logger.warning("The fast image encoder could not be built (%s: %s); the eager tower serves",
                           type(e).__name__, e)
            return None
        if encoder is None:
            logger.info("The image tower has no fast encoder here; the eager tower serves")
        return encoder


class OnnxTextEncoder:
    """A text tower exported to ONNX, run by ONNX Runtime on CPU: `(input_ids, attention_mask) -> (B, D)`."""

    kind = "onnxruntime"

    def __init__(self, tower, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        onnxruntime = import_onnxruntime()
        options = onnxruntime.SessionOptions()
        # As many threads as torch uses here; one pool (inter-op parallelism only helps branchy graphs).
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        # Idle pool threads sleep instead of spinning (as OMP_WAIT_POLICY=PASSIVE for torch, mmgcs.runtime): on a
        # 2-core Space a spinning pool takes the CPU that decoding the next requests needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Through a private folder, not bytes in memory: an in-memory export held the model twice more (the buffer and
        # its copy handed over) while ONNX Runtime made its own. MiniLM + Lite0, after 192 concurrent predictions:
        # 1,559 MB resident from bytes, 1,413 MB from a file. (Its files may stay mapped: removing them is fine on
        # Linux, and a system that refuses leaves them to its temp-folder cleaning.)
        with tempfile.TemporaryDirectory(prefix="mmgcs-onnx-", ignore_cleanup_errors=True) as folder:
            path = os.path.join(folder, "text_tower.onnx")
            _export(tower, input_ids, attention_mask, path)
            release_freed_memory()  # the exporter's traced graph
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}  # an input the graph does not read is dropped

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        feeds = {k: v.cpu().numpy() for k, v in feeds.items() if k in self.inputs}
        return torch.from_numpy(self.session.run(None, feeds)[0])


class OnnxTextTower(torch.nn.Module):
    """A model's text tower once its weights were released (`FastPath(release_eager_text=True)`): the same call,
    run by the checked ONNX Runtime encoder. It has no parameters, so a model holding it is for serving only: its
    state dict lacks the text weights, and `save_pretrained` of it would not load."""

    def __init__(self, encoder: OnnxTextEncoder, out_dim: int):
        super().__init__()
        self.encoder, self.out_dim = encoder, out_dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)


def import_onnxruntime():
    """onnxruntime (the optional extra mmgcs[fast]; ImportError without it) with its telemetry off.

    Since 1.32, ONNX Runtime records a telemetry event (a device id, the interpreter's path, the OS) in
    ~/.cache/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db, queued for upload, when it is imported: measured
    with HOME on an empty folder, `import onnxruntime` alone wrote that database (one row in `events`) and a
    `deviceid` file, also when `disable_telemetry_events()` was called right after the import. Only
    ORT_DISABLE_TELEMETRY=1, set before the import, leaves no file; the call then also stops any later event.
    Forked workers (featurization) inherit the variable.
    """
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # nothing MMGCS starts phones home
    import onnxruntime

    disable = getattr(onnxruntime, "disable_telemetry_events", None)  # in the Python API since 1.x; absent: no-op
    if disable is not None:
        disable()
    return onnxruntime


def _export(tower, input_ids: torch.Tensor, attention_mask: torch.Tensor, path: str) -> None:
    """The text tower as ONNX at `path`, with dynamic batch and sequence axes; its weights in one file beside it.

    The exporter is asked for the graph alone (`export_params=False`): with the weights in, it held them three more
    times while it built one protobuf (constant-folded transposes, the C++ proto, its Python bytes). mpnet + Lite0:
    the server's peak was 2.50 GB with them in, 1.71 GB this way; export and session took 7 s instead of 30-75, and
    ONNX Runtime's scores were the same to the bit. ONNX Runtime folds the transposes itself when it builds the session.
    """
    import onnx  # here: the optional extra mmgcs[fast] (with onnxruntime)

    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "out": {0: "batch"}}
    graph_path = path + ".graph"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer notes are noise here
        torch.onnx.export(tower, (input_ids, attention_mask), graph_path, input_names=["input_ids", "attention_mask"],
                          output_names=["out"], dynamic_axes=axes, opset_version=17, dynamo=False,
                          export_params=False, do_constant_folding=False)
    graph = onnx.load(graph_path)
    os.remove(graph_path)
    _store_weights(graph, tower, os.path.dirname(path))
    onnx.save(graph, path)


WEIGHTS_FILE = "text_tower.weights"


def _store_weights(graph, tower, folder: str) -> None:
    """Each graph input that is one of `tower`'s weights becomes an initializer kept in `folder`/WEIGHTS_FILE, written
    from the tower's own memory one tensor at a time (no copy of the whole model is ever held)."""
    import onnx

    weights = {**dict(tower.named_buffers()), **dict(tower.named_parameters())}
    kept, offset = [], 0
    with open(os.path.join(folder, WEIGHTS_FILE), "wb") as out:
        for graph_input in graph.graph.input:
            if graph_input.name in ("input_ids", "attention_mask"):
                kept.append(graph_input)
                continue
            if graph_input.name not in weights:
                raise RuntimeError(f"the exported graph reads {graph_input.name!r}, which is not a weight of the tower")
            array = weights[graph_input.name].detach().contiguous().numpy()
            offset += out.write(b"\0" * (-offset % 4096))  # page-aligned, so ONNX Runtime may map it
            initializer = onnx.TensorProto(name=graph_input.name, dims=array.shape,
                                           data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
            initializer.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", array.nbytes)):
                entry = initializer.external_data.add()
                entry.key, entry.value = key, str(value)
            offset += out.write(memoryview(array).cast("B"))
            graph.graph.initializer.append(initializer)
    del graph.graph.input[:]
    graph.graph.input.extend(kept)


def _build_text(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Optional[OnnxTextEncoder]:
    if input_ids.device.type != "cpu":
        logger.info("No fast text encoder on %s; the eager text tower serves", input_ids.device.type)
        return None
    try:
        encoder = OnnxTextEncoder(model.text_tower, input_ids, attention_mask)
        # Also on the batch padded 7 tokens longer, twice: a length or batch size baked into the export shows.
        padded = (torch.nn.functional.pad(input_ids, (0, 7)).repeat(2, 1),
                  torch.nn.functional.pad(attention_mask, (0, 7)).repeat(2, 1))
        with torch.inference_mode():
            ok = all(outputs_agree(encoder(*x), model.encode_text(*x), FEATURE_RTOL)
                     for x in ((input_ids, attention_mask), padded))
    except ImportError:
        logger.info("onnxruntime is not installed (pip install 'mmgcs[fast]' for a ~2x faster text tower on CPU); "
                    "the eager text tower serves")
        return None
    except Exception as e:  # noqa: BLE001 — a tower the exporter or ONNX Runtime cannot handle
        logger.warning("The ONNX Runtime text encoder is unavailable (%s: %s); the eager text tower serves",
                       type(e).__name__, e)
        return None
    if not ok:
        logger.info("The ONNX Runtime text encoder disagrees with the eager tower beyond %g; the eager one serves",
                    FEATURE_RTOL)
        return None
    return encoder


def _agrees(encoder, model, sample: torch.Tensor) -> bool:
    with torch.inference_mode():
        return outputs_agree(encoder(sample), model.encode_image(sample.contiguous()), FEATURE_RTOL)


__all__ = ["FEATURE_RTOL", "FastPath", "OnnxTextEncoder", "OnnxTextTower", "fast_path_setting", "import_onnxruntime"]
