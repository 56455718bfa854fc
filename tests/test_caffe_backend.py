"""pycaffe backend (issue 6): the install step's checks, and pycaffe agreeing with the OpenCV engine.

Tests that need pycaffe skip when it is not importable, unless ``INT8CONV_REQUIRE_CAFFE=1`` (CI builds it with
``int8conv install-caffe --install-deps`` first, in .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.caffe.graph import load_graph
from int8conv.calibration.calibrate import calibration_values
from int8conv.calibration.preprocess import ImageTally, iter_batches, list_images
from int8conv.calibration.weight_scales import quantizable_layers
from int8conv.cli import main as int8conv_main
from int8conv.engines import caffe_build, make_engine
from int8conv.errors import BackendUnavailable, ModelError
from int8conv.tables.ncnn_table import read_ncnn_table
from int8conv.zoo import MODELS as SHARED_MODELS
from tests.conftest import convert_tool_res10
from tests.synthetic import write_caffe_model
from tests.test_calibrate_cli import MODELS, model_args
from tests.test_engine_opencv import NET, numpy_forward, weights

pytestmark = [pytest.mark.pycaffe]

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


# ---------------------------------------------------------------- install-caffe, without building


def test_sdist_with_wrong_hash_is_refused_and_removed(tmp_path):
    fake = tmp_path / caffe_build.SDIST_NAME
    fake.write_bytes(b"not the brocolli-caffe sdist")
    with pytest.raises(caffe_build.BuildFailed, match=caffe_build.SDIST_SHA256):
        caffe_build.verify_sdist(fake)
    assert not fake.exists()


def test_cached_sdist_is_reused_without_download(tmp_path, monkeypatch):
    """A verified sdist in the cache is used as is: pip is never called."""
    payload = tmp_path / "download" / caffe_build.SDIST_NAME
    payload.parent.mkdir()
    payload.write_bytes(b"cached")
    monkeypatch.setattr(caffe_build, "SDIST_SHA256", caffe_build.sha256_of(payload))
    monkeypatch.setattr(caffe_build, "_run_logged", lambda *a, **k: pytest.fail("pip must not run"))
    assert caffe_build.fetch_sdist(payload.parent, tmp_path / "log") == payload


def _fake_source(root: Path) -> Path:
    """The exact fragments of the sdist's files that the recipe edits."""
    source = root / f"brocolli-caffe-{caffe_build.CAFFE_VERSION}"
    texts: dict[str, str] = {}
    for relative, old, _ in caffe_build._source_patches(caffe_build.boost_python_name()):
        texts[relative] = texts.get(relative, "# head\n") + old + "\n# between\n"
    for relative, text in texts.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_text(text)
    return source


def test_source_patches_apply_once_and_refuse_a_foreign_tree(tmp_path):
    source = _fake_source(tmp_path)
    caffe_build.patch_sources(source)
    once = {p: p.read_text() for p in source.rglob("*") if p.is_file()}
    caffe_build.patch_sources(source)
    assert {p: p.read_text() for p in source.rglob("*") if p.is_file()} == once
    cmake = once[source / "python/CMakeLists.txt"]
    assert f"-l{caffe_build.boost_python_name()} " in cmake and "-lboost_python \n" not in cmake
    io_py = once[source / "python/caffe/io.py"]
    assert "import skimage.io\nfrom scipy" not in io_py and "tostring" not in io_py and "as_grey" not in io_py
    (source / "python/caffe/io.py").write_text("something else\n")
    with pytest.raises(caffe_build.BuildFailed, match="expected text not found"):
        caffe_build.patch_sources(source)


def test_unpack_keeps_paths_inside_the_tree(tmp_path):
    sdist = tmp_path / caffe_build.SDIST_NAME
    with tarfile.open(sdist, "w:gz") as archive:
        inner = tmp_path / "CMakeLists.txt"
        inner.write_text("project(x)\n")
        archive.add(inner, arcname=f"brocolli-caffe-{caffe_build.CAFFE_VERSION}/CMakeLists.txt")
    source = caffe_build.unpack(sdist, tmp_path / "src")
    assert (source / "CMakeLists.txt").read_text() == "project(x)\n"


def test_failed_step_names_itself_and_shows_the_log(tmp_path):
    log_file = tmp_path / "build.log"
    with pytest.raises(caffe_build.BuildFailed) as failure:
        caffe_build._run_logged(
            [sys.executable, "-c", "print('compiler says no'); raise SystemExit(3)"], "make pycaffe", log_file
        )
    message = str(failure.value)
    assert "make pycaffe failed with exit code 3" in message
    assert "compiler says no" in message and str(log_file) in message


def test_unsupported_platform_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 12, 1, "final", 0))
    with pytest.raises(BackendUnavailable, match="Python 3.11 only"):
        caffe_build.check_platform()
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(BackendUnavailable, match="Linux only"):
        caffe_build.check_platform()


@pytest.mark.skipif(not Path("/etc/debian_version").exists(), reason="needs dpkg (Debian)")
def test_missing_debian_package_prints_the_apt_line(monkeypatch, tmp_path):
    monkeypatch.setattr(caffe_build, "DEBIAN_PACKAGES", ("int8conv-no-such-package",))
    with pytest.raises(BackendUnavailable, match="apt-get install -y --no-install-recommends int8conv-no-such-package"):
        caffe_build.check_toolchain(install_deps=False, log_file=tmp_path / "log")


def test_cli_cuda_request_fails_clearly(tmp_path, capsys):
    """--cuda exits non-zero with the reason (no toolkit, or the fork's CPU-only CMake) and builds nothing."""
    if sys.version_info[:2] != (3, 11) or sys.platform != "linux":
        pytest.skip("the platform check answers first here")
    assert int8conv_main(["install-caffe", "--cuda", "--cache-dir", str(tmp_path)]) == 2
    assert "--cuda" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_build_key_follows_python_and_numpy_abi(monkeypatch):
    key = caffe_build.build_key()
    monkeypatch.setattr(caffe_build, "python_tag", lambda: "cp312")
    assert caffe_build.build_key() != key
    assert caffe_build.build_dir(Path("/c")).name.startswith(f"caffe-{caffe_build.CAFFE_VERSION}-")


# ---------------------------------------------------------------- the built pycaffe


def test_second_install_reuses_the_cache(caffe):
    """`int8conv install-caffe` on a machine that already built it re-links in seconds."""
    package = Path(caffe.__file__).resolve().parent
    if caffe_build.read_build_info(package) is None:
        pytest.skip(f"this pycaffe ({package}) was not built by int8conv install-caffe")
    if package.parent != caffe_build.python_dir(caffe_build.build_dir()):
        pytest.skip(f"this pycaffe was built under another cache dir than {caffe_build.cache_root()}")
    result = caffe_build.install_caffe()
    assert not result.built and result.seconds < 30
    assert result.pth_file.read_text().strip() == str(package.parent)


def test_caffe_and_own_schema_coexist(caffe):
    from caffe.proto import caffe_pb2 as theirs
    from google.protobuf import text_format

    from int8conv.caffe.proto import caffe_pb2 as ours

    text = 'name: "n" layer { name: "c" type: "Convolution" convolution_param { num_output: 3 kernel_size: 1 } }'
    a, b = text_format.Parse(text, theirs.NetParameter()), text_format.Parse(text, ours.NetParameter())
    assert a.SerializeToString() == b.SerializeToString()
    assert theirs.NetParameter.DESCRIPTOR.full_name == "caffe.NetParameter"
    assert ours.NetParameter.DESCRIPTOR.full_name == "int8conv_caffe.NetParameter"


@pytest.fixture(scope="module")
def mixed_net(tmp_path_factory):
    w = weights()
    proto, model = write_caffe_model(tmp_path_factory.mktemp("mix"), NET, w)
    return proto, model, w


def test_every_value_matches_numpy_including_in_place_versions(caffe, mixed_net):
    """conv1 -> bn1 -> sc1 -> relu1 are in place: each version is copied right after its layer."""
    proto, model, w = mixed_net
    graph = load_graph(proto, model)
    engine = make_engine("caffe", graph, proto, model)
    x = RNG.normal(size=(3, 4, 11, 11)).astype(np.float32)
    values = list(numpy_forward(x[:2], w))
    for batch in (x[:2], x):  # the prototxt says 2: a batch of 3 reshapes the net
        got = engine.forward(batch, values)
        assert list(got) == values
        for rows in (slice(0, 2), slice(len(batch) - 2, len(batch))):  # the reference takes pairs
            expected = numpy_forward(batch[rows], w)
            for value in values:
                assert got[value].shape[1:] == expected[value].shape[1:], value
                np.testing.assert_allclose(got[value][rows], expected[value], rtol=1e-4, atol=1e-4, err_msg=value)


def test_engine_errors_are_clear(caffe, mixed_net):
    proto, model, _ = mixed_net
    graph = load_graph(proto, model)
    engine = make_engine("caffe", graph, proto, model)
    with pytest.raises(ModelError, match="'nope'"):
        engine.forward(np.zeros((1, 4, 11, 11), np.float32), ["nope"])
    from int8conv.engines.caffe_engine import caffe_has_cuda

    if not caffe_has_cuda(caffe):
        with pytest.raises(BackendUnavailable, match="CPU-only"):
            make_engine("caffe", graph, proto, model, gpu=0)


# ---------------------------------------------------------------- real models: pycaffe == OpenCV


def _model_paths(shared: Path, key: str) -> tuple[Path, Path]:
    return SHARED_MODELS[key].paths(shared)


def _preprocess(shared: Path, key: str, graph):
    from int8conv.cli import build_parser
    from int8conv.commands.common import preprocess_options

    args = build_parser().parse_args(["calibrate", *model_args(shared, key), "--output", "unused"])
    return preprocess_options(args).for_graph(graph, args.proto), args.images


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max|a-b| / max|b|: the measure issue 6 sets at < 1e-4."""
    scale = float(np.abs(b).max())
    return float(np.abs(a - b).max()) / scale if scale > 0 else float(np.abs(a).max())


@pytest.mark.parametrize("key", sorted(MODELS))
def test_calibration_blobs_equal_opencv(caffe, shared, key):
    """On 2 real images, every blob the calibrator reads: max|caffe - opencv| / max|opencv| < 1e-4."""
    proto, model = _model_paths(shared, key)
    graph = load_graph(proto, model)
    prep, images = _preprocess(shared, key, graph)
    batch, _ = next(iter_batches(list_images(images)[:2], prep, 2, ImageTally()))
    values = calibration_values(graph)
    got = make_engine("caffe", graph, proto, model).forward(batch, values)
    reference = make_engine("opencv", graph, proto, model).forward(batch, values)
    worst = {value: relative_difference(got[value], reference[value]) for value in values}
    assert all(got[v].shape == reference[v].shape for v in values)
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


def _moved_fraction(a, b) -> float:
    """Share of the samples that sit in a different histogram bin (or are zero in one and not the other)."""
    moved = np.abs(a.counts - b.counts).sum() / 2 + abs(a.zeros - b.zeros)
    return float(moved) / max(a.count, 1)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_tables_equal_opencv_to_4_significant_digits(caffe, shared, tmp_path, key):
    """`int8conv calibrate --backend caffe` and `--backend opencv`: the same table to 4 significant digits.

    KL picks an argmin over candidate thresholds, and some layers have two candidates within 0.1% of each other
    in divergence; moving a few samples of 10^4-10^5 across a bin edge (the last float bit of a blob) can swap
    them. Such a layer must still have histograms that agree to 0.1% of their samples, and with a continuous
    method (percentile, minmax) the same statistics give the same scales to 4 digits for every layer.
    """
    from int8conv.calibration.calibrate import build_table
    from int8conv.calibration.histograms import CalibrationStatistics

    tables, stats = {}, {}
    for backend in ("caffe", "opencv"):
        out, saved = tmp_path / f"{backend}.table", tmp_path / f"{backend}.stats"
        args = [
            *model_args(shared, key),
            "--max-images",
            "4",
            "--backend",
            backend,
            "-q",
            "--output",
            str(out),
            "--save-stats",
            str(saved),
        ]
        assert int8conv_main(["calibrate", *args]) == 0
        tables[backend], stats[backend] = read_ncnn_table(out), CalibrationStatistics.load(saved)
    mine, theirs = tables["caffe"], tables["opencv"]
    assert set(mine.activation_scales) == set(theirs.activation_scales)
    assert set(mine.weight_scales) == set(theirs.weight_scales)
    for layer, scales in theirs.weight_scales.items():
        np.testing.assert_allclose(mine.weight_scales[layer], scales, rtol=5e-4, err_msg=layer)
    for value, hist in stats["opencv"].histograms.items():
        other = stats["caffe"].histograms[value]
        assert other.absmax == pytest.approx(hist.absmax, rel=1e-4), value
        assert _moved_fraction(other, hist) <= 1e-3, value
    flips = {
        layer: mine.activation_scales[layer] / scale - 1
        for layer, scale in theirs.activation_scales.items()
        if mine.activation_scales[layer] != pytest.approx(scale, rel=5e-4)
    }
    assert len(flips) <= max(1, len(theirs.activation_scales) // 20), flips  # KL near-ties are rare

    graph = load_graph(*_model_paths(shared, key))
    for method in ("percentile", "minmax"):
        a, b = (build_table(graph, stats[backend], method).table.activation_scales for backend in ("caffe", "opencv"))
        assert set(a) == set(b)
        for layer, scale in b.items():
            assert a[layer] == pytest.approx(scale, rel=5e-4), (method, layer)


def test_convert_tool_runs_on_pycaffe(caffe, shared, tmp_path):
    """The original command line, in a fresh interpreter as a user runs it: with --backend caffe (glog stays
    quiet), and with no backend flag at all (as the original tool was called), which calibrates with ncnn even
    though pycaffe is importable (the faster engine, benchmarks/bench_calibrate.py): the same table but for
    KL near-ties."""
    proto, model = _model_paths(shared, "res10")
    images = tmp_path / "images"
    images.mkdir()
    for source in list_images(shared / "images" / "faces")[:3]:
        (images / source.name).symlink_to(source)
    original = convert_tool_res10(proto, model, images)
    tables = []
    for extra in (["--backend", "caffe"], []):
        out = tmp_path / f"res10{len(tables)}.table"
        done = subprocess.run(
            [*original, "--output", str(out), *extra], capture_output=True, text=True, cwd=ROOT, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert f"with {'caffe' if extra else 'ncnn'}" in done.stderr, done.stderr
        assert "InitGoogleLogging" not in done.stderr, done.stderr
        tables.append(read_ncnn_table(out))
    for layer, scales in tables[0].weight_scales.items():
        np.testing.assert_array_equal(tables[1].weight_scales[layer], scales)
    flips = [
        layer
        for layer, scale in tables[0].activation_scales.items()
        if tables[1].activation_scales[layer] != pytest.approx(scale, rel=5e-4)
    ]
    assert len(flips) <= 1, flips
    table = tables[0]
    deploy = fold_batchnorm_scale(load_graph(proto, model))
    assert set(table.activation_scales) == {layer.name for layer in quantizable_layers(deploy)}
