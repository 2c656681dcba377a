"""Constructor arguments in model specs: `torchvision:resnet18(num_classes=10)`, read as data, never run as code.

A spec's arguments are `name=value` pairs whose values `ast.literal_eval` reads (numbers, strings,
True/False/None, tuples); the canonical spelling (sorted, no spaces) is what pruned files record, so
the spec string alone rebuilds the same model. The dashboard folds its argument fields into the spec.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from torch import nn

from dashboard import state
from prunecore import make_plan, trace
from prunecore.models import (
    ModelSpec,
    ModelSpecError,
    canonical_spec,
    default_input_shape,
    load_model,
    load_pruned,
    parse_spec,
    save_pruned,
    with_args,
)
from prunecore.surgery import apply_plan

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
NEVER = "prunecore_args_never_imported"  # a module name that no refused spec may import


# -- parsing and the canonical spelling -------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("sample:resnet20", "sample:resnet20"),
        ("torchvision:resnet18()", "torchvision:resnet18"),
        (" torchvision:resnet18( num_classes = 10 ) ", "torchvision:resnet18(num_classes=10)"),
        ("timm:resnet18(num_classes=10, in_chans=1)", "timm:resnet18(in_chans=1,num_classes=10)"),
        ("timm:test_vit(img_size=(32, 48),drop_rate=0.1)", "timm:test_vit(drop_rate=0.1,img_size=(32,48))"),
        ("pkg.mod:build(names=('a',), flag=True, none=None, x=-1.5e-3)",
         "pkg.mod:build(flag=True,names=('a',),none=None,x=-0.0015)"),
        ("pkg.mod:build(tag='a, b) c:d')", "pkg.mod:build(tag='a, b) c:d')"),  # commas, parens, colons in a string
    ],
)
def test_specs_parse_to_one_canonical_spelling(spec, canonical):
    parsed = parse_spec(spec)
    assert str(parsed) == canonical_spec(spec) == canonical
    assert parse_spec(canonical) == parsed and canonical_spec(canonical) == canonical  # a fixed point


def test_parsed_spec_holds_kind_name_and_sorted_arguments():
    parsed = parse_spec("timm:resnet18(num_classes=10,in_chans=1)")
    assert parsed == ModelSpec("timm", "resnet18", (("in_chans", 1), ("num_classes", 10)))
    assert parsed.kwargs == {"in_chans": 1, "num_classes": 10} and not parsed.runs_code
    assert parse_spec("pkg.mod:build(width=2)").runs_code


def test_with_args_adds_fields_to_a_spec_and_refuses_one_given_twice():
    assert with_args("timm:resnet18(drop_rate=0.1)", {"num_classes": 10, "in_chans": None}) == (
        "timm:resnet18(drop_rate=0.1,num_classes=10)"
    )
    assert with_args("torchvision:resnet18()", {}) == "torchvision:resnet18"
    with pytest.raises(ModelSpecError, match="already sets num_classes"):
        with_args("timm:resnet18(num_classes=5)", {"num_classes": 10})


@pytest.mark.parametrize(
    "argument",
    [f"__import__({NEVER!r})", "lambda: 1", "os", "open('x')", "print", "(1, os)", "f'{x}'", "1 if True else 2"],
)
def test_code_in_an_argument_is_refused_unrun(argument):
    spec = f"torchvision:resnet18(num_classes={argument})"
    with pytest.raises(ModelSpecError) as info:
        load_model(spec)
    message = str(info.value)
    assert "'num_classes'" in message and "never code" in message and len(message.splitlines()) == 1
    assert NEVER not in sys.modules


@pytest.mark.parametrize(
    "spec, message",
    [
        ("torchvision:resnet18(10)", "every argument needs a name"),
        ("torchvision:resnet18(**kw)", "every argument needs a name"),
        ("torchvision:resnet18(a=1,a=2)", "'a' is given more than once"),
        ("torchvision:resnet18(num_classes=10", "must end with '\\)'"),
        ("torchvision:resnet18(a=1)(b=2)", "cannot read its arguments"),
        ("torchvision:resnet18(a=1), g(b=2)", "cannot read its arguments"),
        ("torchvision:resnet18(a=1 2)", "cannot read its arguments"),
        ("torchvision:resnet18(a=[1, 2])", "'a' is a list.*write a tuple"),
        ("torchvision:resnet18(a={'k': 1})", "'a' is a dict"),
        ("torchvision:resnet18(a=1j)", "'a' is a complex"),
        ("torchvision:resnet18(a=1e999)", "'a' is inf, not a finite number"),
        ("sample:resnet20(num_classes=10)", "sample models are fixed trained models and take no arguments"),
        ("torchvision:resnet18(weights='DEFAULT')", "'weights' would load or download weights"),
        ("timm:resnet18(checkpoint_path='/tmp/x.pt')", "'checkpoint_path' would load or download weights"),
        ("timm:resnet18(pretrained=True)", "'pretrained' would load or download weights"),
        ("resnet18(num_classes=10)", "must look like"),
        ("pkg mod:build", "is not a package.module:function"),
    ],
)
def test_malformed_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(ModelSpecError, match=message) as info:
        parse_spec(spec)
    assert len(str(info.value).splitlines()) == 1


# -- building models with arguments -----------------------------------------------------------------
def test_a_ten_class_resnet18_state_dict_loads_with_num_classes(tmp_path):
    import torchvision

    trained = torchvision.models.resnet18(num_classes=10)
    torch.save(trained.state_dict(), tmp_path / "resnet18-10.pt")
    model = load_model("torchvision:resnet18(num_classes=10)", tmp_path / "resnet18-10.pt")
    assert model.fc.out_features == 10 and not model.training
    torch.testing.assert_close(model.fc.weight, trained.fc.weight, rtol=0, atol=0)
    with pytest.raises(ModelSpecError, match=r"does not fit ResNet.*torchvision:resnet18\(num_classes=10\)"):
        load_model("torchvision:resnet18", tmp_path / "resnet18-10.pt")  # the message says what to add


@pytest.mark.parametrize(
    "spec, argument",
    [
        ("torchvision:resnet18(num_clases=10)", "num_clases"),
        ("torchvision:resnet18(num_classes=-1)", "num_classes"),  # a value the model rejects
        ("torch.nn:Linear(in_features=4,out_feature=2)", "out_feature"),
    ],
)
def test_a_wrong_argument_names_the_spec_and_the_argument(spec, argument):
    with pytest.raises(ModelSpecError) as info:
        load_model(spec)
    message = str(info.value)
    assert canonical_spec(spec) in message and f"argument {argument!r}" in message
    assert len(message.splitlines()) == 1


def test_a_factory_spec_passes_its_arguments_to_the_factory():
    model = load_model("torch.nn:Linear(out_features=2, in_features=4, bias=False)")
    assert isinstance(model, nn.Linear) and model.weight.shape == (2, 4) and model.bias is None


def test_torchvision_image_size_changes_the_default_input():
    assert default_input_shape("torchvision:resnet18(num_classes=10)") == (1, 3, 224, 224)
    assert default_input_shape("torchvision:vit_b_16(image_size=384)") == (1, 3, 384, 384)
    assert default_input_shape("pkg.mod:build(width=2)") is None


def test_timm_in_chans_and_img_size_change_the_default_input():
    pytest.importorskip("timm")
    assert default_input_shape("timm:test_resnet") == (1, 3, 160, 160)
    assert default_input_shape("timm:test_resnet(in_chans=1)") == (1, 1, 160, 160)
    assert default_input_shape("timm:test_vit(img_size=(32,48))") == (1, 3, 32, 48)
    spec = "timm:test_vit(img_size=32,in_chans=1,num_classes=10)"
    shape = default_input_shape(spec)
    assert shape == (1, 1, 32, 32)
    assert load_model(spec)(torch.randn(shape)).shape == (1, 10)  # the model takes the input it names


# -- pruned-model files with arguments ---------------------------------------------------------------
def test_a_pruned_file_with_an_args_spec_round_trips(tmp_path):
    model = load_model("torchvision:resnet18(num_classes=10)")
    graph = trace(model, torch.randn(1, 3, 64, 64))
    plan = make_plan(model, graph, 0.5)
    pruned = apply_plan(model, plan, graph=graph).eval()
    path = save_pruned(tmp_path / "pruned.pt", pruned, plan, " torchvision:resnet18( num_classes = 10 )")
    assert torch.load(path, weights_only=True)["model"] == "torchvision:resnet18(num_classes=10)"  # canonical
    loaded, loaded_plan = load_pruned(path)
    assert loaded_plan == plan and loaded.fc.out_features == 10
    got, want = loaded.state_dict(), pruned.state_dict()
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_a_data_kind_file_with_a_loading_argument_is_refused(tmp_path):
    """timm is a data kind, but a file may not make it read a checkpoint (torch.load of any pickle)."""
    evil = "timm:resnet18(checkpoint_path='/tmp/evil.pt')"
    torch.save({"format": "prunecore.pruned/1", "model": evil, "plan": "{}", "state_dict": {}}, tmp_path / "f.pt")
    with pytest.raises(ModelSpecError, match="'checkpoint_path' would load or download weights") as info:
        load_pruned(tmp_path / "f.pt")
    assert str(tmp_path / "f.pt") in str(info.value)


PROBE = "prunecore_args_probe"
PROBE_SOURCE = textwrap.dedent(
    """
    from pathlib import Path

    from torch import nn

    (Path(__file__).parent / "imported.marker").write_text("imported")


    def build(width=4):
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, 4, 1))
    """
)


@pytest.fixture
def factory_file(tmp_path, monkeypatch) -> Path:
    """A pruned file whose spec is the probe factory with an argument, `build(width=8)`, half its channels kept."""
    (tmp_path / f"{PROBE}.py").write_text(PROBE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PROBE, raising=False)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    graph = trace(model, torch.randn(1, 3, 8, 8))
    plan = make_plan(model, graph, 0.5)
    return save_pruned(tmp_path / "probe.pt", apply_plan(model, plan, graph=graph), plan, f"{PROBE}:build(width=8)")


def test_a_factory_spec_with_arguments_in_a_file_is_still_code(factory_file):
    for named in (None, "sample:resnet20", f"{PROBE}:build(width=16)", f"{PROBE}:build"):
        with pytest.raises(ModelSpecError, match=f"names code '{PROBE}:build\\(width=8\\)'"):
            load_pruned(factory_file, model=named)
    assert not (factory_file.parent / "imported.marker").exists() and PROBE not in sys.modules


def test_the_same_factory_spec_named_by_the_caller_runs_however_it_is_spelled(factory_file):
    pruned, _ = load_pruned(factory_file, model=f"{PROBE}:build( width = 8 )")
    assert (factory_file.parent / "imported.marker").exists()
    assert pruned[0].out_channels == 4  # built with width=8, half kept


# -- errors name the upload --------------------------------------------------------------------------
def test_a_bad_weights_file_is_named_by_its_display_name(tmp_path):
    temp = tmp_path / "tmp8x2k" / "uploaded-weights.pt"
    temp.parent.mkdir()
    temp.write_bytes(b"not a torch file")
    with pytest.raises(ModelSpecError) as info:
        load_model("torchvision:resnet18", temp, weights_name="my-resnet.pt")
    assert "'my-resnet.pt'" in str(info.value) and str(temp) not in str(info.value)


# -- the dashboard ------------------------------------------------------------------------------------
@pytest.fixture
def page(monkeypatch, tmp_path):
    """The Model page on loopback (the Factory box offered), a run store of its own, a small data limit."""
    from streamlit import config

    monkeypatch.setenv("PRUNECORE_STORE", str(tmp_path / "runs.db"))
    monkeypatch.delenv(state.REMOTE_ENV, raising=False)
    original = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    at = AppTest.from_file(APP, default_timeout=600)
    at.session_state[state.DATA_LIMIT] = 16
    yield at.run()
    config.set_option("server.address", original)


def test_dashboard_argument_fields_build_the_spec_and_offer_other_data(page):
    at = page
    at.radio(key="model_source").set_value("torchvision architecture").run()
    at.number_input(key="arg_num_classes").set_value(10).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state[state.MODEL_SPEC] == "torchvision:resnet18(num_classes=10)"
    assert "num_classes" in at.number_input(key="arg_num_classes").label
    # the sample digits do not fit a 3x224x224 model: said so, with a way out
    assert any("1x28x28" in w.value and "random label-free" in w.value for w in at.warning)
    at.button(key="use_random_data").click().run()
    assert not at.exception
    assert at.radio(key="data_source").value == "Random (label-free)"
    assert at.session_state[state.DATA_SPEC] == state.RANDOM_DATA
    assert not at.warning and any("random label-free data (16 Gaussian" in c.value for c in at.caption)


def test_dashboard_other_arguments_join_the_fields_and_code_is_refused(page):
    at = page
    at.radio(key="model_source").set_value("torchvision architecture").run()
    at.number_input(key="arg_num_classes").set_value(10).run()
    at.text_input(key="arg_extra").set_value("zero_init_residual=True").run()
    assert at.session_state[state.MODEL_SPEC] == "torchvision:resnet18(num_classes=10,zero_init_residual=True)"
    at.text_input(key="arg_extra").set_value(f"groups=__import__({NEVER!r})").run()
    assert not at.exception
    assert any("'groups'" in e.value and "never code" in e.value for e in at.error)
    assert NEVER not in sys.modules
    assert at.session_state[state.MODEL_SPEC] == "torchvision:resnet18(num_classes=10,zero_init_residual=True)"


def test_dashboard_timm_fields_set_channels_and_image_size(page):
    pytest.importorskip("timm")
    at = page
    at.radio(key="model_source").set_value("timm architecture").run()
    at.selectbox(key="timm_name").set_value("test_vit").run()
    at.number_input(key="arg_in_chans").set_value(1).run()
    at.number_input(key="arg_img_size").set_value(32).run()
    at.number_input(key="arg_num_classes").set_value(10).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state[state.MODEL_SPEC] == "timm:test_vit(img_size=32,in_chans=1,num_classes=10)"
    assert not at.error
    assert any("1x1x32x32" in w.value for w in at.warning)  # the digits are 28x28: still offered other data


def test_dashboard_factory_models_take_uploaded_weights(page):
    at = page
    at.radio(key="model_source").set_value("Factory function").run()
    (uploader,) = at.get("file_uploader")
    assert uploader.proto.label.startswith("Weights")
    at.text_input(key="factory_spec").set_value("torch.nn:Conv2d( in_channels=1, out_channels=4, kernel_size=3 )")
    at.text_input(key="input_shape_text").set_value("1,1,28,28").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state[state.MODEL_SPEC] == "torch.nn:Conv2d(in_channels=1,kernel_size=3,out_channels=4)"


def test_dashboard_errors_name_the_uploaded_file(page):
    at = page
    at.session_state[state.MODEL_SPEC] = "torchvision:resnet18"
    at.session_state[state.WEIGHTS] = b"not a torch file"
    at.session_state[state.WEIGHTS_NAME] = "my-resnet.pt"
    at.switch_page("views/export.py").run()  # a page without the uploader: it keeps the upload
    assert not at.exception, [e.value for e in at.exception]
    (error,) = [e.value for e in at.error]
    assert "'my-resnet.pt'" in error and "uploaded-weights" not in error and "not a readable" in error
