"""import-weights against the real references (a random transformers ViT; its weights in timm's and
MindCV's layouts), then fine-tuning from imported weights, inference, export and the run's plot."""
import json
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import last_checkpoint, load_params, ok, tiny_config, vit_dist, vit_model
from vit_dist.host.checkpoint_files import head_classes
from vit_dist.host.errors import CheckpointError
from vit_dist.training import checkpoint
from vit_dist.cli import main
from vit_dist.host.config import load_config
from vit_dist.tools.infer import preprocess, write_predictions


# The test extra installs them: a machine without them fails here rather than skipping in silence.
import torch  # noqa: E402
import transformers  # noqa: E402


def hf_vit(folder, **config):
    """A random ViTForImageClassification (32 px, patch 8, width 64, 2 layers, 4 heads, 5 classes),
    saved with save_pretrained; weights drawn wider than the default 0.02 so logits are O(1)."""
    torch.manual_seed(0)
    settings = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                    patch_size=8, num_labels=5, initializer_range=0.2)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**{**settings, **config})).eval()
    model.save_pretrained(folder)
    return model


def reference_logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images), interpolate_pos_encoding=True).logits.numpy()


def our_logits(config, weights, images: np.ndarray) -> np.ndarray:
    import mindspore as ms

    cfg = load_config(config)
    net = vit_model(cfg, cfg.model.num_classes or head_classes(weights))
    checkpoint.load_weights(net, weights)
    net.set_train(False)
    return net(ms.Tensor(images)).asnumpy()


def import_weights(src, out, source, *extra) -> None:
    assert main(["import-weights", str(src), str(out), "--from", source, "--config-out", str(out.with_suffix(".yaml")),
                 *extra]) == 0


def images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("size", [32, 48, 24])
def test_hugging_face_vit_gives_the_same_logits_at_its_size_and_after_interpolation(tmp_path, size):
    model = hf_vit(tmp_path / "hf")
    import_weights(tmp_path / "hf", tmp_path / "vit.safetensors", "hf", "--image-size", str(size))
    cfg = yaml.safe_load((tmp_path / "vit.yaml").read_text())
    assert cfg["model"]["layer_norm_eps"] == 1e-12 and cfg["data"]["image_size"] == size
    # ViTImageProcessor's defaults (no preprocessor_config.json): bilinear, straight to the size, 0.5.
    assert cfg["data"]["mean"] == cfg["data"]["std"] == [0.5, 0.5, 0.5]
    assert cfg["data"]["interpolation"] == "bilinear" and cfg["data"]["eval_crop_fraction"] == 1.0
    x = images(size)
    want = reference_logits(model, x)
    assert np.abs(want).max() > 0.5
    assert np.abs(our_logits(tmp_path / "vit.yaml", tmp_path / "vit.safetensors", x) - want).max() < 1e-4


def test_a_pytorch_bin_state_dict_imports_like_safetensors_and_pickles_are_refused(tmp_path, capsys):
    names = ["cat", "dog", "fox", "owl", "yak"]
    model = hf_vit(tmp_path / "hf", id2label=dict(enumerate(names)))
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    import_weights(tmp_path / "hf", tmp_path / "a.safetensors", "hf")
    import_weights(folder, tmp_path / "b.safetensors", "hf")
    a, b = load_params(tmp_path / "a.safetensors"), load_params(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "classes.json").read_text()) == names  # where infer looks first

    torch.save({"weights": model.state_dict(), "payload": Image.new("L", (1, 1))}, folder / "pytorch_model.bin")
    capsys.readouterr()
    assert main(["import-weights", str(folder), str(tmp_path / "c.safetensors"), "--from", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read {folder / 'pytorch_model.bin'} as a weights-only PyTorch state dict")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "c.safetensors").exists()


# transformers' names -> another library's; the q/k/v projections are fused separately.
TIMM = [(r"vit\.embeddings\.cls_token", "cls_token"), (r"vit\.embeddings\.position_embeddings", "pos_embed"),
        (r"vit\.embeddings\.patch_embeddings\.projection\.(\w+)", r"patch_embed.proj.\1"),
        (r"vit\.encoder\.layer\.(\d)\.layernorm_before\.(\w+)", r"blocks.\1.norm1.\2"),
        (r"vit\.encoder\.layer\.(\d)\.layernorm_after\.(\w+)", r"blocks.\1.norm2.\2"),
        (r"vit\.encoder\.layer\.(\d)\.attention\.output\.dense\.(\w+)", r"blocks.\1.attn.proj.\2"),
        (r"vit\.encoder\.layer\.(\d)\.intermediate\.dense\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
        (r"vit\.encoder\.layer\.(\d)\.output\.dense\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
        (r"vit\.layernorm\.(\w+)", r"norm.\1"), (r"classifier\.(\w+)", r"head.\1")]
# MindCV's legacy ViT (mindcv/models/vit.py): MindSpore LayerNorms hold gamma/beta.
MINDCV = [(r"vit\.embeddings\.cls_token", "backbone.cls"),
          (r"vit\.embeddings\.position_embeddings", "backbone.pos_embedding"),
          (r"vit\.embeddings\.patch_embeddings\.projection\.(\w+)", r"backbone.patch_embedding.conv.\1"),
          (r"vit\.encoder\.layer\.(\d)\.layernorm_before\.(\w+)", r"backbone.transformer.layers.\1.0.cell.0.\2"),
          (r"vit\.encoder\.layer\.(\d)\.layernorm_after\.(\w+)", r"backbone.transformer.layers.\1.1.cell.0.\2"),
          (r"vit\.encoder\.layer\.(\d)\.attention\.output\.dense\.(\w+)",
           r"backbone.transformer.layers.\1.0.cell.1.out.\2"),
          (r"vit\.encoder\.layer\.(\d)\.intermediate\.dense\.(\w+)",
           r"backbone.transformer.layers.\1.1.cell.1.dense1.\2"),
          (r"vit\.encoder\.layer\.(\d)\.output\.dense\.(\w+)", r"backbone.transformer.layers.\1.1.cell.1.dense2.\2"),
          (r"vit\.layernorm\.(\w+)", r"backbone.norm.\1"), (r"classifier\.(\w+)", r"head.classifier.\1")]


def relayout(folder, table, qkv: str) -> dict[str, np.ndarray]:
    """The save_pretrained file's tensors (transformers' stable names) in another layout."""
    state = load_params(folder / "model.safetensors")
    out = {}
    for name, value in state.items():
        for pattern, target in table:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, target, name)] = value
    for layer in range(2):
        hf = f"vit.encoder.layer.{layer}.attention.attention."
        for kind in ("weight", "bias"):
            out[qkv.format(layer=layer, kind=kind)] = np.concatenate([state[f"{hf}{p}.{kind}"]
                                                                      for p in ("query", "key", "value")])
    return out


def test_timm_layout_with_fused_qkv_gives_the_reference_logits(tmp_path, capsys):
    from safetensors.numpy import save_file

    model = hf_vit(tmp_path / "hf", layer_norm_eps=1e-6)  # timm's epsilon
    save_file(relayout(tmp_path / "hf", TIMM, "blocks.{layer}.attn.qkv.{kind}"), str(tmp_path / "timm.safetensors"))
    capsys.readouterr()
    assert main(["import-weights", str(tmp_path / "timm.safetensors"), str(tmp_path / "x.safetensors"),
                 "--from", "timm"]) == 2
    assert "width 64 is not a standard ViT size" in capsys.readouterr().err
    import_weights(tmp_path / "timm.safetensors", tmp_path / "vit.safetensors", "timm", "--num-heads", "4")
    x = images(32)
    got = our_logits(tmp_path / "vit.yaml", tmp_path / "vit.safetensors", x)
    assert np.abs(got - reference_logits(model, x)).max() < 1e-4


def photo(path, size: tuple[int, int]):
    """A JPEG photo of ImageNet's kind (scikit-learn's china.jpg, resized to size, quality 90)."""
    from sklearn.datasets import load_sample_image

    Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.BICUBIC).save(path, quality=90)
    return path


def data_section(config) -> tuple:
    data = yaml.safe_load(config.read_text())["data"]
    return data["interpolation"], data["eval_crop_fraction"], data["mean"], data["std"]


# (timm model, whether its config.json keeps the pretrained_cfg timm's hub files carry; without it,
# import-weights looks the model's name up in timm): two preprocessings, a crop fraction of 1 at 384 px
# with mean 0.5, and 0.9 at 224 px with ImageNet's mean.
@pytest.mark.parametrize("name, with_cfg", [("vit_tiny_patch16_384.augreg_in21k_ft_in1k", True),
                                            ("deit_tiny_patch16_224.fb_in1k", False)])
def test_timm_weights_keep_timms_preprocessing_and_eval_gives_timms_pixels(tmp_path, name, with_cfg):
    """The config import-weights writes holds what timm.data.resolve_data_config resolves for the
    model, and vit-dist's eval transform then turns an ImageNet-size JPEG into timm's eval tensor
    (create_transform of that data config): same pixels, to float rounding. A photo whose resize
    leaves an even margin: on an odd one, MindSpore's center crop floors half the margin where
    torchvision rounds it, a one-pixel shift (docs/weights.md)."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import save_for_hf

    model = timm.create_model(name, pretrained=False)
    save_for_hf(model, tmp_path / "timm", safe_serialization=True)
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    if not with_cfg:
        del config["pretrained_cfg"]
        (tmp_path / "timm" / "config.json").write_text(json.dumps(config))
    import_weights(tmp_path / "timm" / "model.safetensors", tmp_path / "vit.safetensors", "timm")
    want = resolve_data_config({}, model=model)
    assert data_section(tmp_path / "vit.yaml") == (want["interpolation"], want["crop_pct"], list(want["mean"]),
                                                   list(want["std"]))
    jpeg = photo(tmp_path / "photo.jpg", (500, 375))
    ours = preprocess([jpeg], load_config(tmp_path / "vit.yaml"))[0]
    theirs = create_transform(**want)(Image.open(jpeg).convert("RGB")).numpy()
    assert ours.shape == theirs.shape == (3, want["input_size"][1], want["input_size"][2])
    assert np.abs(ours - theirs).max() < 1e-5


def test_timm_weights_without_a_config_say_their_preprocessing_is_unknown(tmp_path, capsys):
    from safetensors.numpy import save_file

    hf_vit(tmp_path / "hf", layer_norm_eps=1e-6)
    save_file(relayout(tmp_path / "hf", TIMM, "blocks.{layer}.attn.qkv.{kind}"), str(tmp_path / "timm.safetensors"))
    capsys.readouterr()
    import_weights(tmp_path / "timm.safetensors", tmp_path / "vit.safetensors", "timm", "--num-heads", "4")
    notes = [line for line in capsys.readouterr().err.splitlines() if "preprocessing is unknown" in line]
    assert notes == [f"note: the source's preprocessing is unknown: {tmp_path / 'config.json'} gives no "
                     "pretrained_cfg; --config-out keeps data.interpolation, eval_crop_fraction, mean and std as "
                     "they are"]
    assert data_section(tmp_path / "vit.yaml") == ("bilinear", 0.875, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_hugging_face_processor_config_carries_over_and_eval_gives_its_pixels(tmp_path):
    """DeiT's processor (bicubic resize to 256x256, center crop 224, ImageNet's mean and std) saved
    beside a ViT: the config gets its preprocessing, and vit-dist's eval gives the processor's
    pixel_values for a square photo (where resizing to 256x256 and resizing the short side agree),
    each within one level of 255: transformers 5 resizes in floating point with torchvision, which
    rounds a few values (0.6% here) one level away from Pillow's fixed-point bicubic that vit-dist's
    matches."""
    hf_vit(tmp_path / "hf", image_size=224, patch_size=32)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    processor = transformers.DeiTImageProcessor(image_mean=mean, image_std=std)
    processor.save_pretrained(tmp_path / "hf")
    import_weights(tmp_path / "hf", tmp_path / "vit.safetensors", "hf")
    assert data_section(tmp_path / "vit.yaml") == ("bicubic", 0.875, mean, std)
    jpeg = photo(tmp_path / "photo.jpg", (400, 400))
    ours = preprocess([jpeg], load_config(tmp_path / "vit.yaml"))
    theirs = processor(Image.open(jpeg).convert("RGB"), return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    levels = np.abs(ours - theirs) * np.array(std)[:, None, None] * 255
    assert levels.max() < 1.001 and levels.mean() < 0.05


def test_a_malformed_processor_config_is_one_line(tmp_path, capsys):
    hf_vit(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"image_mean": "blue"}))
    capsys.readouterr()
    assert main(["import-weights", str(tmp_path / "hf"), str(tmp_path / "vit.safetensors"), "--from", "hf"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'hf' / 'preprocessor_config.json'}: image_mean 'blue' " \
                                      "is not one number or three\n"
    assert not (tmp_path / "vit.safetensors").exists()


def test_mindcv_checkpoint_with_tanh_gelu_gives_the_reference_logits(tmp_path):
    import mindspore as ms

    # MindCV's legacy ViT: MindSpore's LayerNorm epsilon (1e-7) and nn.GELU default (tanh approximation).
    model = hf_vit(tmp_path / "hf", layer_norm_eps=1e-7, hidden_act="gelu_pytorch_tanh")
    state = relayout(tmp_path / "hf", MINDCV, "backbone.transformer.layers.{layer}.0.cell.1.qkv.{kind}")
    state = {re.sub(r"(cell\.0|norm)\.weight$", r"\1.gamma", re.sub(r"(cell\.0|norm)\.bias$", r"\1.beta", k)): v
             for k, v in state.items()}
    state["adam_m.backbone.norm.gamma"] = np.ones(64, np.float32)  # optimizer state: ignored
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], str(tmp_path / "mindcv.ckpt"))
    import_weights(tmp_path / "mindcv.ckpt", tmp_path / "vit.safetensors", "mindcv", "--num-heads", "4")
    assert yaml.safe_load((tmp_path / "vit.yaml").read_text())["model"]["gelu_approximate"] is True
    # MindCV's ViT recipes' evaluation (configs/vit/*.yaml), which its checkpoints do not record.
    assert data_section(tmp_path / "vit.yaml") == ("bicubic", 0.875, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    x = images(32)
    got = our_logits(tmp_path / "vit.yaml", tmp_path / "vit.safetensors", x)
    assert np.abs(got - reference_logits(model, x)).max() < 1e-4


@pytest.fixture(scope="module")
def finetuned(tiny_data, tmp_path_factory):
    """The random HF ViT imported at 16 px without its head, then 2 fine-tuning steps at lr 1e-9 on
    the tiny digits (3 classes): a run whose parameters are still the imported ones."""
    tmp = tmp_path_factory.mktemp("finetune")
    hf_vit(tmp / "hf")
    base = tiny_config(tmp / "base.yaml", tiny_data, data={"augment": False},
                       train={"epochs": 1, "max_steps": 2, "lr": 1e-9, "min_lr": 0.0, "eval_batch_size": 3,
                              "output_dir": str(tmp / "run")})
    assert main(["import-weights", str(tmp / "hf"), str(tmp / "vit.safetensors"), "--from", "hf", "--image-size", "16",
                 "--drop-head", "--config-out", str(tmp / "ft.yaml"), "--base", str(base)]) == 0
    trained = ok(vit_dist("train", str(tmp / "ft.yaml")))
    return {"tmp": tmp, "config": tmp / "ft.yaml", "run": tmp / "run", "trained": trained,
            "ckpt": last_checkpoint(tmp / "run"), "data": tiny_data}


def test_fine_tuning_starts_from_the_imported_weights_and_reports_the_missing_head(finetuned):
    assert (f"pretrained {finetuned['tmp'] / 'vit.safetensors'}: loaded 38 of 40 tensors; missing (initialised "
            "fresh): ['head.bias', 'head.weight']; unexpected (ignored): none") in finetuned["trained"].stderr
    imported = load_params(finetuned["tmp"] / "vit.safetensors")
    tuned = load_params(finetuned["ckpt"])
    assert tuned["head.weight"].shape == (3, 64)
    assert all(np.abs(tuned[k] - v).max() < 1e-6 for k, v in imported.items())
    assert json.loads((finetuned["run"] / "classes.json").read_text()) == ["digit0", "digit1", "digit7"]


def test_infer_names_classes_and_agrees_with_eval(finetuned, tmp_path):
    out = tmp_path / "preds.json"
    result = ok(vit_dist("infer", str(finetuned["config"]), "--ckpt", str(finetuned["ckpt"]),
                         "--images", str(finetuned["data"] / "val"), "--topk", "2", "--out", str(out)))
    predictions = json.loads(out.read_text())
    assert len(predictions) == 9 and len(result.stdout.strip().splitlines()) == 10  # 9 images + "wrote"
    for p in predictions:
        probs = [t["prob"] for t in p["topk"]]
        assert len(probs) == 2 and 1 >= probs[0] >= probs[1] > 0
        assert {t["class"] for t in p["topk"]} <= {"digit0", "digit1", "digit7"}
    top1 = np.mean([p["topk"][0]["class"] == p["image"].split("/")[-2] for p in predictions])
    assert top1 == pytest.approx(json.loads((finetuned["run"] / "eval.json").read_text())["top1"])
    # The run's weights-only file predicts the same (its tensors are the model's of that checkpoint).
    ok(vit_dist("infer", str(finetuned["config"]), "--ckpt", str(finetuned["run"] / "weights" / "last.safetensors"),
                "--images", str(finetuned["data"] / "val"), "--topk", "2", "--out", str(tmp_path / "again.json")))
    assert json.loads((tmp_path / "again.json").read_text()) == predictions
    write_predictions(predictions[:2], tmp_path / "preds.csv")  # --out x.csv: one row per image and rank
    rows = (tmp_path / "preds.csv").read_text().splitlines()
    top = predictions[1]["topk"][1]
    assert rows[0] == "image,rank,class,index,prob" and len(rows) == 5
    assert rows[4] == f"{predictions[1]['image']},2,{top['class']},{top['index']},{top['prob']:.6g}"


def test_exported_mindir_loads_back_with_the_same_logits(finetuned, tmp_path):
    import mindspore as ms
    from mindspore import nn

    # From the run's weights-only file: the same weights as the full checkpoint it compares with.
    ok(vit_dist("export", str(finetuned["config"]), "--ckpt", str(finetuned["run"] / "weights" / "last.safetensors"),
                "--out", str(tmp_path / "vit.mindir"), "--batch-size", "2"))
    x = images(16, seed=3)
    exported = nn.GraphCell(ms.load(str(tmp_path / "vit.mindir")))(ms.Tensor(x)).asnumpy()
    assert np.abs(exported - our_logits(finetuned["config"], finetuned["ckpt"], x)).max() < 1e-5
    # MindSpore 2.10's ONNX exporter has no converter for the exact GELU's Erf.
    result = vit_dist("export", str(finetuned["config"]), "--ckpt", str(finetuned["ckpt"]), "--format", "onnx",
                      "--out", str(tmp_path / "vit.onnx"))
    assert result.returncode == 2 and result.stderr.strip().startswith("error: MindSpore 2.10 cannot export exact GELU")
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_ends_with_a_plot_and_plot_redraws_it(finetuned, tmp_path, capsys):
    with Image.open(finetuned["run"] / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] == 700
    assert main(["plot", str(finetuned["run"]), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path} has no metrics.jsonl; pass a run directory " \
                                              "(train.output_dir)"


def test_pretrained_of_another_class_count_reinitialises_the_head_and_a_body_mismatch_is_refused(tmp_path):
    from safetensors.numpy import save_file

    def tiny(classes, size=16):
        cfg = load_config(None, ["model.variant=ti", "model.patch_size=8", f"data.image_size={size}", "model.depth=1"])
        return vit_model(cfg, classes)

    source = {p.name: p.asnumpy() for p in tiny(5).get_parameters()}
    save_file(source, str(tmp_path / "five.safetensors"))
    net, lines = tiny(3), []
    fresh_head = net.head.weight.asnumpy()
    checkpoint.load_pretrained(net, tmp_path / "five.safetensors", lines.append)
    assert lines == [f"pretrained {tmp_path / 'five.safetensors'}: loaded 22 of 24 tensors; re-initialised for another "
                     "class count: ['head.bias', 'head.weight']; missing (initialised fresh): none; "
                     "unexpected (ignored): none"]
    assert np.array_equal(net.head.weight.asnumpy(), fresh_head)
    assert all(np.array_equal(p.asnumpy(), source[p.name]) for p in net.get_parameters() if "head" not in p.name)
    with pytest.raises(CheckpointError, match=r"does not fit model\.\*: pos_embed \(1, 5, 192\) vs "
                                                         r"\(1, 10, 192\); .*--image-size"):
        checkpoint.load_pretrained(tiny(5, size=24), tmp_path / "five.safetensors", lines.append)


@pytest.mark.parametrize("version, refused", [("2.5.1+cu121", True), ("1.13.1", True), ("2.6.0", False),
                                              ("2.13.0+cpu", False), ("3", False)])
def test_torch_files_need_a_torch_whose_weights_only_load_is_safe(version, refused):
    """torch.load(weights_only=True) can be made to run code before torch 2.6: older ones are refused."""
    from vit_dist.tools.weights import _release

    assert (_release(version) < (2, 6)) is refused


def test_an_output_named_like_mindspores_own_format_is_refused(tmp_path):
    """import-weights writes safetensors: an OUT ending in .ckpt (MindSpore's own format) would hold
    bytes MindSpore's .ckpt reader cannot read, so it is refused in one line and nothing is written."""
    result = vit_dist("import-weights", str(tmp_path / "src.safetensors"), str(tmp_path / "out.ckpt"), "--from", "timm")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'out.ckpt'}: import-weights writes safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random HF ViT (timm's LayerNorm epsilon, named classes) imported with its config, then
    exported from that file and config --to hf and --to timm (exact and tanh GELU)."""
    tmp = tmp_path_factory.mktemp("export")
    result = {}
    for act in ("gelu", "gelu_pytorch_tanh"):
        folder = tmp / act
        hf_vit(folder / "hf", layer_norm_eps=1e-6, hidden_act=act, id2label=dict(enumerate(CLASS_NAMES)))
        import_weights(folder / "hf", folder / "vit.safetensors", "hf")
        for target in ("hf", "timm"):
            assert main(["export-weights", str(folder / "vit.safetensors"), "--config", str(folder / "vit.yaml"),
                         "--to", target, "--out", str(folder / f"out_{target}")]) == 0
        result[act] = folder
    return result


CLASS_NAMES = ["cat", "dog", "fox", "owl", "yak"]


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).logits.numpy() if hasattr(model, "config") else \
            model(torch.from_numpy(x)).numpy()


def close(got: np.ndarray, want: np.ndarray) -> bool:
    """Within 1e-4 of the largest logit (float32 through different kernels)."""
    return np.abs(want).max() > 0.5 and np.abs(got - want).max() < 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_exported_weights_give_our_logits_in_transformers_and_timm(exported, act):
    """Each library loads the folder by its own documented call and gives vit-dist's logits."""
    import timm
    from safetensors.torch import load_file
    from timm.data import resolve_data_config

    folder = exported[act]
    x = images(32, seed=5)
    ours = our_logits(folder / "vit.yaml", folder / "vit.safetensors", x)
    hf = transformers.ViTForImageClassification.from_pretrained(folder / "out_hf").eval()
    assert close(torch_logits(hf, x), ours)
    assert [hf.config.id2label[i] for i in range(5)] == CLASS_NAMES
    # timm: the folder as timm's own export, and the state dict into create_model(..., strict=True).
    by_folder = timm.create_model(f"local-dir:{folder / 'out_timm'}", pretrained=True).eval()
    assert close(torch_logits(by_folder, x), ours)
    config = json.loads((folder / "out_timm" / "config.json").read_text())
    assert config["label_names"] == CLASS_NAMES
    by_name = timm.create_model(config["architecture"], **config["model_args"]).eval()
    by_name.load_state_dict(load_file(str(folder / "out_timm" / "model.safetensors")), strict=True)
    assert close(torch_logits(by_name, x), ours)
    overlay = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=dict(
        config["pretrained_cfg"], file=str(folder / "out_timm" / "model.safetensors")), **config["model_args"]).eval()
    assert close(torch_logits(overlay, x), ours)
    same = [json.dumps(resolve_data_config({}, model=m), sort_keys=True) for m in (overlay, by_folder)]
    assert same[0] == same[1]  # the overlay carries the preprocessing too (input_size a list there, a tuple here)


@pytest.mark.parametrize("target", ["hf", "timm"])
def test_export_then_import_gives_the_same_tensors_and_preprocessing(exported, target, tmp_path):
    folder = exported["gelu"]
    src = folder / f"out_{target}" / ("model.safetensors" if target == "timm" else "")
    import_weights(src, tmp_path / "back.safetensors", target)
    before, after = load_params(folder / "vit.safetensors"), load_params(tmp_path / "back.safetensors")
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert data_section(tmp_path / "back.yaml") == data_section(folder / "vit.yaml")
    back, source = (yaml.safe_load(p.read_text())["model"] for p in (tmp_path / "back.yaml", folder / "vit.yaml"))
    assert {k: back[k] for k in ("embed_dim", "depth", "num_heads", "mlp_dim", "num_classes", "patch_size",
                                 "layer_norm_eps", "gelu_approximate")} == \
           {k: source[k] for k in ("embed_dim", "depth", "num_heads", "mlp_dim", "num_classes", "patch_size",
                                   "layer_norm_eps", "gelu_approximate")}
    assert json.loads((tmp_path / "classes.json").read_text()) == CLASS_NAMES


def test_exported_preprocessing_gives_our_eval_pixels_in_transformers_and_timm(tmp_path):
    """Bicubic resize to 224/0.9, center crop, ImageNet's statistics: the processor transformers'
    AutoImageProcessor loads from the hf folder and timm's data config of the timm folder turn a
    500x375 JPEG into vit-dist's eval tensor (transformers within one level of 255, as in the import
    test above; timm to float rounding)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    from vit_dist.host.weights_only import WeightsCard, write_weights
    from vit_dist.models.spec import parameter_shapes

    cfg = load_config(None, ["model.variant=ti", "model.patch_size=32", "model.depth=1", "data.image_size=224",
                             "data.interpolation=bicubic", "data.eval_crop_fraction=0.9"])
    card = WeightsCard.of(cfg, 3)
    rng = np.random.default_rng(0)
    write_weights(tmp_path / "w.safetensors", {n: rng.standard_normal(s).astype(np.float32)
                                               for n, s in parameter_shapes(card.spec).items()}, card)
    for target in ("hf", "timm"):
        assert main(["export-weights", str(tmp_path / "w.safetensors"), "--to", target,
                     "--out", str(tmp_path / target)]) == 0
    jpeg = photo(tmp_path / "photo.jpg", (500, 375))
    ours = preprocess([jpeg], cfg)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    theirs = processor(Image.open(jpeg).convert("RGB"), return_tensors="np")["pixel_values"]
    levels = np.abs(ours - theirs) * np.array(cfg.data.std)[:, None, None] * 255
    assert ours.shape == theirs.shape == (1, 3, 224, 224) and levels.max() < 1.001 and levels.mean() < 0.05
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    timm_pixels = create_transform(**resolve_data_config({}, model=model))(Image.open(jpeg).convert("RGB")).numpy()
    assert np.abs(ours[0] - timm_pixels).max() < 1e-5


def test_a_run_keeps_weights_only_best_and_last_that_rebuild_its_net(finetuned):
    """The fine-tuning run's weights/ files: the model's tensors only, metadata that builds the net
    (no config needed) and gives the full checkpoint's logits, the run's classes, preprocessing and step."""
    import mindspore as ms

    from vit_dist.host.weights_only import read_card, weights_path
    from vit_dist.models.spec import parameter_shapes
    from vit_dist.models.vit import VisionTransformer

    cfg = load_config(finetuned["config"])
    full = vit_model(cfg, 3)
    checkpoint.load_weights(full, finetuned["ckpt"])
    x = images(16, seed=4)
    want = full(ms.Tensor(x)).asnumpy()
    for kind in ("best", "last"):
        path = weights_path(finetuned["run"], kind)
        card = read_card(path)
        assert set(load_params(path)) == set(parameter_shapes(card.spec))
        assert (card.classes, card.step, card.weights) == (("digit0", "digit1", "digit7"), 2, "model")
        assert (card.interpolation, card.crop_fraction, card.mean, card.std) == \
               (cfg.data.interpolation, cfg.data.eval_crop_fraction, tuple(cfg.data.mean), tuple(cfg.data.std))
        assert (card.spec.layer_norm_eps, card.spec.image_size) == (1e-12, 16)  # the imported HF ViT's
        net = VisionTransformer(card.spec)
        checkpoint.load_weights(net, path)
        net.set_train(False)
        assert np.array_equal(net(ms.Tensor(x)).asnumpy(), want)


def test_export_of_a_run_directory_and_what_a_target_cannot_express(finetuned, tmp_path, capsys):
    """The run's best weights go to transformers with their class names; timm cannot take the HF
    epsilon 1e-12, so --to timm is one line naming the fix and writes nothing, as is an existing --out
    or a checkpoint whose architecture nothing records."""
    assert main(["export-weights", str(finetuned["run"]), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf")
    assert [model.config.id2label[i] for i in range(3)] == ["digit0", "digit1", "digit7"]
    capsys.readouterr()
    cases = [([str(finetuned["run"]), "--to", "timm", "--out", str(tmp_path / "timm")],
              "error: timm's ViT fixes LayerNorm epsilon at 1e-06 and these weights were trained with 1e-12 "
              "(model.layer_norm_eps); export them --to hf, whose config records it"),
             ([str(finetuned["run"]), "--to", "hf", "--out", str(tmp_path / "hf")],
              f"error: {tmp_path / 'hf'} exists; export-weights writes a new folder: remove it or choose another "
              "--out"),
             ([str(finetuned["tmp"] / "vit.safetensors"), "--to", "hf", "--out", str(tmp_path / "x")],
              f"error: {finetuned['tmp'] / 'vit.safetensors'} records no architecture (a full checkpoint or "
              "imported weights); pass --config CONFIG, the config it was trained with (RUN_DIR/config.yaml)"),
             ([str(finetuned["run"] / "weights" / "best.safetensors"), "--ema", "--to", "hf", "--out",
               str(tmp_path / "x")],
              f"error: {finetuned['run'] / 'weights' / 'best.safetensors'} is a weights-only file of one set of "
              "weights (metadata: weights model); leave out --ema")]
    for args, message in cases:
        assert main(["export-weights", *args]) == 2
        assert capsys.readouterr().err == message + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
