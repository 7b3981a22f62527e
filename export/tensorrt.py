"""TensorRT engines from a bundle's ONNX graphs (TensorRT 10 Python API).

One engine per graph: FP16 when asked, one optimisation profile with min/opt/max shapes for
every dynamic axis (the axis names the manifest records), and a shared timing cache
(``timing.cache``) that later builds reuse. Engine files are tagged with the TensorRT version and
the GPU's compute capability, ``<graph>.trt<version>.sm<cc>.engine``; the runtime refuses an engine
whose tag does not match its host (and says to rebuild with ``fbnet export --engines-only``).

Where TensorRT or a GPU is absent, :func:`tensorrt_status` says why and nothing is built.
"""

from __future__ import annotations

from pathlib import Path

from fbnet.runtime.engine.engine_tags import engine_name, gpu_compute_capability
from fbnet.runtime.engine.manifest import GraphSpec
from fbnet.windows import blocks_upto

from .onnx_export import ExportError

#: min / opt / max extents for each named dynamic axis; the box axes come from the bundle's J and
#: levels (:func:`box_profile`).
PROFILE = {"images": (1, 8, 64), "captions": (1, 128, 1024), "words": (1, 16, 64)}


def box_profile(max_boxes: int, levels: int) -> dict[str, tuple[int, int, int]]:
    """Profile extents of the box axes: 1 to J boxes (opt: a third of J, near the mean box count on
    Flickr8k), ``box_blocks_<u>`` = u**2 times as many blocks, and the image encoder's
    ``region_blocks``: the window boxes of the whole image and of each box, ``(1 + boxes) B``."""
    lo, opt, hi = 1, max(1, round(max_boxes / 3)), max_boxes
    b = blocks_upto(levels)
    return {"boxes": (lo, opt, hi), "region_blocks": ((1 + lo) * b, (1 + opt) * b, (1 + hi) * b),
            **{f"box_blocks_{u}": (u * u * lo, u * u * opt, u * u * hi) for u in (1, 2, 3)}}


def tensorrt_status() -> tuple[bool, str]:
    """(can build, reason) for this host."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install 'fbnet[gpu]' on a GPU host)"
    if gpu_compute_capability() is None:
        return False, "no NVIDIA GPU is visible (nvidia-smi found none)"
    return True, "ok"


def build_engines(bundle: Path, graphs: dict[str, GraphSpec], max_boxes: int, levels: int, fp16: bool = True,
                  log=print) -> dict[str, str]:
    """Build an engine for every ``graphs[name].file`` in ``bundle``; return name -> engine file."""
    import tensorrt as trt

    cc = gpu_compute_capability()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = bundle / "timing.cache"
    built = {}
    for name, spec in graphs.items():
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(bundle / spec.file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"{spec.file}: TensorRT's ONNX parser failed: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for inp in spec.inputs:
            shapes = profile_shapes(inp.shape, max_boxes, levels)
            if shapes is not None:
                profile.set_shape(inp.name, *shapes)
        config.add_optimization_profile(profile)
        log(f"building TensorRT engine for {spec.file} ({'fp16' if fp16 else 'fp32'})")
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ExportError(f"{spec.file}: TensorRT could not build an engine (see the log above)")
        fname = engine_name(name, trt.__version__, cc)
        (bundle / fname).write_bytes(bytes(plan))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        built[name] = fname
    return built


def profile_shapes(shape: list, max_boxes: int, levels: int) -> tuple[tuple, tuple, tuple] | None:
    """(min, opt, max) for an input whose shape names dynamic axes; None when it is static."""
    if all(isinstance(d, int) and d > 0 for d in shape):
        return None
    extents = {**PROFILE, **box_profile(max_boxes, levels)}
    lo, opt, hi = ([], [], [])
    for d in shape:
        a, b, c = extents.get(d, (1, 1, 1)) if isinstance(d, str) else (d, d, d)
        lo.append(a)
        opt.append(b)
        hi.append(c)
    return tuple(lo), tuple(opt), tuple(hi)
