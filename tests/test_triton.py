"""Triton: the model repository's configs (parsed with Triton's own protobuf) and a live Triton
server (PyTriton, in its own numpy < 2 environment) answering as the built-in server does."""

import hashlib
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner

from fbnet.runtime.engine.bundle import open_bundle
from fbnet.runtime.serving.service import SearchService, TextQuery

from conftest import free_ports


@pytest.fixture(scope="module")
def repository(served, tmp_path_factory):
    from fbnet.cli import main

    retriever, _, gallery = served
    out = tmp_path_factory.mktemp("triton") / "repo"
    res = CliRunner().invoke(main, ["export", str(retriever.bundle.root), "--triton", str(out),
                                    "--gallery", str(gallery)])
    assert res.exit_code == 0, res.output
    return out


def parse(path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="tritonclient (the dev extra) is not installed")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_configs_name_the_graphs_real_inputs_and_outputs(repository, served):
    from tritonclient.grpc import model_config_pb2 as pb

    bundle = open_bundle(served[0].bundle.root)
    types = {"float32": pb.TYPE_FP32, "int64": pb.TYPE_INT64}
    graphs = bundle.manifest.graphs
    assert sorted(p.name for p in repository.iterdir()) == sorted(
        [f"fbnet_{g}" for g in graphs] + ["fbnet_search_image", "fbnet_search_text"])
    for graph, spec in graphs.items():
        cfg = parse(repository / f"fbnet_{graph}" / "config.pbtxt")
        assert cfg.name == f"fbnet_{graph}" and cfg.platform == "onnxruntime_onnx"
        model = repository / f"fbnet_{graph}" / "1" / "model.onnx"
        assert hashlib.sha256(model.read_bytes()).hexdigest() == bundle.manifest.files[spec.file]
        batched = graph in ("image_encoder", "text_encoder")
        assert cfg.max_batch_size == (16 if batched else 0) and cfg.HasField("dynamic_batching") == batched
        for declared, real in ((cfg.input, spec.inputs), (cfg.output, spec.outputs)):
            assert [t.name for t in declared] == [t.name for t in real]
            for t, r in zip(declared, real):
                dims = [-1 if isinstance(d, str) else d for d in r.shape][1 if batched else 0:]
                assert t.data_type == types[r.dtype]
                assert list(t.reshape.shape if t.HasField("reshape") else t.dims) == dims
                assert list(t.dims) == (dims or [1])
        assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_AUTO
        (accel,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    for kind in ("text", "image"):
        cfg = parse(repository / f"fbnet_search_{kind}" / "config.pbtxt")
        assert cfg.backend == "python" and cfg.max_batch_size == 16 and cfg.HasField("dynamic_batching")
        assert [(t.name, t.optional) for t in cfg.input] == [(kind, False), ("top_k", True), ("shortlist", True),
                                                             ("nprobe", True)]
        assert [t.name for t in cfg.output] == ["result"] and cfg.output[0].data_type == pb.TYPE_STRING
        assert cfg.parameters["kind"].string_value == kind
        assert cfg.parameters["gallery"].string_value == str(served[2].resolve())
        assert "TritonPythonModel" in (repository / f"fbnet_search_{kind}" / "1" / "model.py").read_text()


def test_triton_requests_carry_shortlist_and_nprobe():
    """Optional INT32 inputs, -1 meaning the server's (or the IVF index's) default."""
    from fbnet.runtime.serving.triton import parse_rows

    rows = parse_rows("text", {"text": np.array([[b"a dog"], [b"a cat"], [b"a bird"]], dtype=np.object_),
                               "shortlist": np.array([[-1], [0], [50]], dtype=np.int32),
                               "nprobe": np.array([[-1], [16], [0]], dtype=np.int32)}, canvas=64)
    assert (rows[0].shortlist, rows[0].nprobe) == (None, None)
    assert (rows[1].shortlist, rows[1].nprobe) == (0, 16)
    assert isinstance(rows[2], ValueError) and "nprobe" in str(rows[2])
    plain = parse_rows("text", {"text": np.array([[b"a dog"]], dtype=np.object_)}, canvas=64)[0]
    assert plain.nprobe is None and plain.top_k == 5


def test_export_triton_refuses_a_folder_that_is_not_a_gallery(served, tmp_path):
    from fbnet.cli import main

    res = CliRunner().invoke(main, ["export", str(served[0].bundle.root), "--triton", str(tmp_path / "r"),
                                    "--gallery", str(tmp_path)])
    assert res.exit_code != 0 and "not a gallery" in res.output and not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def pytriton_python():
    from fbnet.runtime.serving.triton_env import TritonEnvError, build

    try:
        return build()
    except TritonEnvError as exc:
        pytest.skip(f"the PyTriton environment cannot be built here: {str(exc)[:300]}")


def http_status(url, body=None):
    """(status, parsed JSON body or None) of one request."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except (urllib.error.URLError, ConnectionError):
        return None, None


def test_live_triton_answers_as_the_builtin_server(served, gallery_inputs, pytriton_python, tmp_path):
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient (the dev extra) is not installed")
    from tritonclient.utils import InferenceServerException

    retriever, g, gallery = served
    http, grpc, metrics = free_ports(3)
    base = f"http://127.0.0.1:{http}"
    proc = subprocess.Popen([str(pytriton_python), "-m", "fbnet.runtime.cli", "triton", "--bundle",
                             str(retriever.bundle.root), "--gallery", str(gallery), "--shortlist", "5",
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                             "--log-file", str(tmp_path / "triton.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        deadline = time.time() + 120
        while http_status(base + "/v2/health/ready")[0] != 200:  # what the docs tell a user to wait on
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "Triton did not become ready within 120 s"
            time.sleep(0.2)
        # ready means both search models are loaded (not a few seconds before them)
        assert client.is_model_ready("fbnet_search_text") and client.is_model_ready("fbnet_search_image")

        def ask(kind, value, top_k, shortlist=-1):
            inputs = [grpcclient.InferInput(kind, [1, 1], "BYTES"), grpcclient.InferInput("top_k", [1, 1], "INT32"),
                      grpcclient.InferInput("shortlist", [1, 1], "INT32")]
            inputs[0].set_data_from_numpy(np.array([[value]], dtype=np.object_))
            inputs[1].set_data_from_numpy(np.array([[top_k]], dtype=np.int32))
            inputs[2].set_data_from_numpy(np.array([[shortlist]], dtype=np.int32))
            out = client.infer(f"fbnet_search_{kind}", inputs).as_numpy("result")
            return json.loads(out[0][0])

        builtin = SearchService(retriever, g, 5)
        captions = ["a big red circle on grass", "two small blue squares", "a green triangle", "a yellow star"]
        with ThreadPoolExecutor(8) as pool:  # concurrent: Triton's dynamic batcher groups them
            answers = list(pool.map(lambda c: ask("text", c.encode(), 4), captions * 2))
        for caption, got in zip(captions * 2, answers):
            want = builtin.search_texts([TextQuery(caption, 4)])[0]
            assert [h["index"] for h in got["hits"]] == [h["index"] for h in want["hits"]]
            assert np.allclose([h["score"] for h in got["hits"]], [h["score"] for h in want["hits"]], atol=1e-5)
        image = sorted((gallery_inputs / "images").iterdir())[1]
        got = ask("image", image.read_bytes(), 3, 0)
        from fbnet.preprocess import load_image
        from fbnet.runtime.serving.service import ImageQuery

        want = builtin.search_images([ImageQuery(load_image(image, retriever.bundle.canvas), 3, 0)])[0]
        assert [h["caption"] for h in got["hits"]] == [h["caption"] for h in want["hits"]]
        # a bad query is a request error (gRPC INVALID_ARGUMENT, HTTP 400), not a success
        for kind, value, message in (("text", b"   ", "empty caption"), ("image", b"garbage", "cannot decode")):
            with pytest.raises(InferenceServerException, match=message) as failed:
                ask(kind, value, 3)
            assert failed.value.status() == "StatusCode.INVALID_ARGUMENT"
        infer = base + "/v2/models/fbnet_search_text/infer"
        status, err = http_status(infer, json.dumps({"inputs": [
            {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [""]}]}).encode())
        assert status == 400 and "empty caption" in err["error"] and "Traceback" not in err["error"]
        # ... that fails alone: good queries batched with bad ones are answered
        with ThreadPoolExecutor(8) as pool:
            mixed = list(pool.map(lambda c: _answer_or_error(ask, c.encode()), ["", "a green triangle"] * 4))
        assert [isinstance(m, InferenceServerException) for m in mixed] == [True, False] * 4
        want = builtin.search_texts([TextQuery("a green triangle", 4)])[0]
        assert all([h["index"] for h in m["hits"]] == [h["index"] for h in want["hits"]] for m in mixed[1::2])
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    left = subprocess.run(["pgrep", "-f", f"tritonserver.*{http}"], capture_output=True, text=True).stdout
    assert not left.strip(), "a tritonserver process outlived the test"


def _answer_or_error(ask, caption):
    from tritonclient.utils import InferenceServerException

    try:
        return ask("text", caption, 4)
    except InferenceServerException as exc:
        return exc
