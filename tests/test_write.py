"""Writing the dataset: dictionary files, metadata.json, the dataset card, and reading it back with `datasets`."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from transforms.write import (
    FolderInvalid, dataset_card, read_card_front_matter, validate_output_folder, write_metadata,
)

D = 16


def test_dictionary_files_have_a_fixed_size_float32_direction_sorted_by_concept(dataset_folder):
    files = sorted((dataset_folder / "dictionary").glob("*.parquet"))
    assert [f.name for f in files] == ["layer_015.parquet", "layer_016.parquet"]
    for path, layer in zip(files, (15, 16)):
        table = pq.read_table(path)
        assert table.schema.field("direction").type == pa.list_(pa.float32(), D)
        assert table.column_names == ["concept_id", "layer", "direction", "n_pos", "n_neg", "norm"]
        ids = table.column("concept_id").to_pylist()
        assert ids == sorted(ids) and set(table.column("layer").to_pylist()) == {layer}


def test_metadata_records_models_versions_counts_and_untrained(dataset_folder):
    meta = json.loads((dataset_folder / "metadata.json").read_text())
    assert meta["untrained"] is True  # the CLIP model was random, the MLLM was not
    assert meta["models"]["mllm"]["id"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert meta["layers"] == [15, 16] and meta["pooling"] == "mean" and meta["dimension"] == D
    assert {"torch", "transformers", "open_clip_torch", "apache-beam", "daco400k"} <= set(meta["versions"])
    assert meta["counts"]["concepts"] == 4 and meta["counts"]["stimuli"] == 16
    assert meta["counts"]["directions"] == 8 and meta["counts"]["directions_read"] > 0


def test_metadata_rejects_missing_keys_and_counts_that_disagree_with_the_files(dataset_folder):
    with pytest.raises(ValueError, match="prompt_template"):
        write_metadata(str(dataset_folder), {"models": {"mllm": {"id": "x"}}, "layers": [15], "pooling": "mean", "seeds": {}})
    info = {"models": {"mllm": {"id": "x"}}, "layers": [15, 16], "pooling": "mean", "prompt_template": "", "seeds": {},
            "counts": {"stimuli": 99}}
    with pytest.raises(ValueError, match="counts.stimuli is 99 .* 16 rows"):
        write_metadata(str(dataset_folder), info)


def test_card_declares_configs_features_licence_and_warns_when_untrained(dataset_folder):
    from datasets import Features

    text = (dataset_folder / "README.md").read_text()
    front = read_card_front_matter(text)
    assert {c["config_name"]: c["data_files"][0]["path"] for c in front["configs"]} == {
        "dictionary": "dictionary/*.parquet", "concepts": "concepts.parquet", "stimuli": "stimuli/*.parquet"}
    assert front["license"] and front["size_categories"] == ["n<1K"] and "feature-extraction" in front["task_categories"]
    infos = {i["config_name"]: i for i in front["dataset_info"]}
    for name, path in (("dictionary", "dictionary/layer_015.parquet"), ("concepts", "concepts.parquet"),
                       ("stimuli", "stimuli/stimuli-00000-of-00001.parquet")):
        declared = Features._from_yaml_list(infos[name]["features"])
        assert declared == Features.from_arrow_schema(pq.read_schema(dataset_folder / path)), name
    assert {"name": "direction", "list": "float32", "length": D} in infos["dictionary"]["features"]
    assert "not meaningful" in text and "Qwen/Qwen2-VL-2B-Instruct" in text and "difference" in text.lower()
    meta = json.loads((dataset_folder / "metadata.json").read_text())
    trained = dataset_card(dataset_folder, {**meta, "untrained": False})
    assert "not meaningful" not in trained and "untrained-model" not in yaml.safe_load(trained.split("---")[1])["tags"]


def test_datasets_reads_every_config_back_offline(dataset_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import io
    import logging

    import datasets
    import huggingface_hub.constants

    logged = io.StringIO()  # the card's splits carry num_bytes, so `datasets` has nothing to warn about
    handler = logging.StreamHandler(logged)
    logging.getLogger("datasets").addHandler(handler)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    dictionary = datasets.load_dataset(str(dataset_folder), "dictionary", split="train", cache_dir=str(tmp_path))
    assert dictionary.features["direction"] == datasets.List(datasets.Value("float32"), length=D)
    assert len(dictionary) == 8
    expected = pq.read_table(dataset_folder / "dictionary" / "layer_015.parquet").to_pylist()[0]
    first = dictionary.filter(lambda r: r["layer"] == 15)[0]
    assert first["concept_id"] == expected["concept_id"] and first["direction"] == pytest.approx(expected["direction"])
    assert len(datasets.load_dataset(str(dataset_folder), "concepts", split="train", cache_dir=str(tmp_path))) == 4
    stimuli = datasets.load_dataset(str(dataset_folder), "stimuli", split="train", cache_dir=str(tmp_path))
    assert len(stimuli) == 16 and set(stimuli["role"]) == {"positive", "negative"}
    logging.getLogger("datasets").removeHandler(handler)
    assert "dataset_info" not in logged.getvalue(), logged.getvalue()


def test_validation_accepts_the_good_folder_and_lists_what_to_upload(dataset_folder):
    files = {f.path: f.size for f in validate_output_folder(dataset_folder)}
    assert set(files) == {"README.md", "metadata.json", "concepts.parquet", "stimuli/stimuli-00000-of-00001.parquet",
                          "dictionary/layer_015.parquet", "dictionary/layer_016.parquet", "deadletter/directions.jsonl"}
    assert files["dictionary/layer_015.parquet"] == (dataset_folder / "dictionary" / "layer_015.parquet").stat().st_size
    with pytest.raises(FolderInvalid, match="not a directory"):
        validate_output_folder(dataset_folder / "nope")


def test_report_and_publish_read_a_folder_through_one_reader(tmp_path):
    """Both commands read metadata.json and the folder through transforms.output_folder: the same
    file gives the same message, each in the command's own error type."""
    from pipeline.report import ReportError, make_report
    from transforms.output_folder import FolderUnreadable, open_folder, read_metadata

    assert issubclass(ReportError, FolderUnreadable) and issubclass(FolderInvalid, FolderUnreadable)
    (tmp_path / "metadata.json").write_text("{not json")
    message = r"metadata.json: not valid JSON \(.*\); re-run `daco build`"
    with pytest.raises(ReportError, match=message):
        make_report(tmp_path)
    with pytest.raises(FolderInvalid, match=message):
        with open_folder(tmp_path, (), FolderInvalid) as local:
            read_metadata(local)
    with pytest.raises(ReportError, match="nope: not a directory; pass the output folder of `daco build`"):
        make_report(tmp_path / "nope")
