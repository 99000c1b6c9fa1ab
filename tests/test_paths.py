"""Input paths in a config file are read beside the config file; on the command line, from the working directory."""

import json

from renio_pl.cli import main


def printed(args, capsys) -> dict:
    import yaml

    try:
        main(args + ["--print_config"])
    except SystemExit:
        pass
    return yaml.safe_load(capsys.readouterr().out)


def test_relative_paths_in_a_config_resolve_beside_it(tmp_path, monkeypatch, capsys, model_dirs):
    configs, elsewhere = tmp_path / "project" / "configs", tmp_path / "elsewhere"
    (configs / "data").mkdir(parents=True)
    (configs / "data" / "train.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "val.jsonl").write_text('{"prompt": "2+2", "answer": "4"}\n')
    config = {
        "model": {"student": str(model_dirs["student"]), "teacher": "Qwen/Qwen3-1.7B"},
        "data": {"train_path": "data/train.jsonl", "val_path": "data/val.jsonl",
                 "test_sets": [{"name": "t", "path": "data/train.jsonl"}]},
    }
    (configs / "run.yaml").write_text(json.dumps(config))
    monkeypatch.chdir(elsewhere)
    data = printed(["fit", "--config", str(configs / "run.yaml")], capsys)["data"]
    assert data["train_path"] == str(configs / "data" / "train.jsonl")  # beside the config
    assert data["test_sets"][0]["path"] == str(configs / "data" / "train.jsonl")
    assert data["val_path"] == str(elsewhere / "data" / "val.jsonl")  # not beside it: the working directory's
    assert printed(["fit", "--config", str(configs / "run.yaml")], capsys)["model"]["teacher"] == "Qwen/Qwen3-1.7B"
    # the command line is read from the working directory
    given = printed(["fit", "--config", str(configs / "run.yaml"), "--data.train_path", "data/val.jsonl"], capsys)
    assert given["data"]["train_path"] == str(elsewhere / "data" / "val.jsonl")
