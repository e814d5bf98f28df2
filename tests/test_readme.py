"""README works as printed: every command it shows is run by a test, and it cites only files
that exist in the repository."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from pathlib import Path

from tests.readme import README, REPO, commands

RUN_BY = {
    # key of a README command (tests.readme.Command.key) -> the test that runs it as printed
    "make demo": "tests/test_demo.py::test_make_demo_shows_learning",
    "make demo DEMO_MODEL DEMO_PRETRAINED": "tests/test_demo.py::test_make_demo_shows_learning",
    "make test": "tests/test_readme.py::test_make_test_is_the_suite_ci_runs",
    "python -m pipeline.synthetic --frames --scenes --seed --small":
        "tests/test_commands.py::test_synthetic_scenes_as_printed",
    "python -m flows.extract_clip --dataset --model --pretrained --root --store":
        "tests/flows/test_commands.py::test_rerun_as_in_the_table_encodes_nothing",
    "python -m flows.extract_clip --dataset --model --pretrained --root --store --stride":
        "tests/flows/test_commands.py::test_stage_1_as_printed",
    "python -m flows.extract_clip --dataset --model --pretrained --root --store --task-runner "
    "--workers": "tests/flows/test_commands.py::test_dask_local_cluster_as_printed",
    "python -m flows.extract_clip --dataset --root --store ...":
        "tests/flows/test_extract_clip_sens.py::test_readme_command_on_raw_scannet",
    "python -m flows.extract_clip --dataset --model --pretrained --root --store --stride #2":
        "tests/flows/test_extract_clip_sens.py::test_readme_command_on_raw_scannet",
    "python -m flows.extract_clip --dataset --model --pretrained --root --spatial-kind --store":
        "tests/model/test_commands.py::test_maskclip_store_as_printed",
    "python -m flows.serve": "tests/flows/test_deployment.py::test_deployment_run_as_printed",
    "prefect deployment run --param ...":
        "tests/flows/test_deployment.py::test_deployment_run_as_printed",
    "prefect server start --host": "tests/flows/test_deployment.py::test_deployment_run_as_printed",
    "python -m flows.serve --name": "tests/flows/test_deployment.py::test_deployment_run_as_printed",
    "prefect deployment run --param --watch":
        "tests/flows/test_deployment.py::test_deployment_run_as_printed",
    "python -m storage.inspect --json --verify": "tests/test_commands.py::test_inspect_as_printed",
    "python -m model.train --cache": "tests/model/test_commands.py::test_train_as_printed",
    "python -m model.train --cache --epochs": "tests/model/test_commands.py::test_train_as_printed",
    "python -m model.train --cache --featureset --val-list":
        "tests/model/test_commands.py::test_train_on_a_featureset_with_a_val_list",
    "python -m model.train --cache --resume": "tests/model/test_commands.py::test_resume_as_printed",
    "python -m flows.extract_clip --dataset --encoder --image-size --model --pretrained --root "
    "--store": "tests/pipeline/test_dinov2_encoder.py::"
    "test_extracted_beside_clip_trained_on_and_refused_by_text_queries",
    "python -m model.train --cache --epochs --featureset": "tests/pipeline/test_dinov2_encoder.py::"
    "test_extracted_beside_clip_trained_on_and_refused_by_text_queries",
    "python -m model.evaluate --cache --checkpoint --export --json --render":
        "tests/model/test_commands.py::test_evaluate_as_printed",
    "python -m model.evaluate --cache --checkpoint --export --json --render #2":
        "tests/model/test_commands.py::test_evaluate_as_printed",
    "python -m model.evaluate --cache --json --predictions":
        "tests/model/test_commands.py::test_score_a_submission_as_printed",
    "python -m model.evaluate --cache --json --predictions #2":
        "tests/model/test_commands.py::test_score_a_submission_as_printed",
    "python -m benchmarks.run --device --json --quick":
        "tests/test_benchmarks.py::test_quick_benchmark_writes_every_row",
    "python -m benchmarks.stability --json --quick":
        "tests/test_stability_benchmark.py::test_quick_run_measures_every_route",
    "python -m benchmarks.backbone --json --quick --voxels":
        "tests/test_backbone_benchmark.py::test_quick_run_measures_every_row",
    "python -m benchmarks.store_requests --json --quick --scenes":
        "tests/test_store_requests_benchmark.py::test_quick_store_requests_benchmark",
    "python -m benchmarks.sens --quick": "tests/test_sens_benchmark.py::test_quick_sens_benchmark",
    "python -m benchmarks.zero_shot --quick":
        "tests/test_zero_shot_benchmark.py::test_quick_run_measures_every_row",
    "python -m pipeline.text_embeddings --prompts --scannet20 --store":
        "tests/model/test_commands.py::test_text_embeddings_ahead_of_queries",
    "python -m pipeline.text_embeddings --prompts --scannet20 --store #2":
        "tests/model/test_commands.py::test_text_embeddings_ahead_of_queries",
    "python -m model.query --cache --scene --text":
        "tests/model/test_commands.py::test_query_by_text_in_one_command",
    "python -m model.query --cache --checkpoint --eval --scene":
        "tests/model/test_commands.py::test_query_eval_with_a_checkpoint",
    "python -m model.query --cache --checkpoint --eval --scene --text":
        "tests/model/test_commands.py::test_query_as_in_the_table",
    "dask scheduler --port": "tests/flows/test_scale.py::test_dask_cluster_into_s3_as_printed",
    "dask worker --nthreads --nworkers --resources":
        "tests/flows/test_scale.py::test_dask_cluster_into_s3_as_printed",
    "python -m flows.extract_clip --dask-address --dask-resources --dataset --model --pretrained "
    "--root --store": "tests/flows/test_scale.py::test_dask_cluster_into_s3_as_printed",
    "python -m flows.extract_clip --dask-address --store ...":
        "tests/flows/test_scale.py::test_dask_cluster_into_s3_as_printed",
    "python -m flows.extract_clip --storage-options --store ...":
        "tests/flows/test_scale.py::test_s3_storage_options_as_printed",
    "python -m model.train --cache --storage-options":
        "tests/flows/test_scale.py::test_s3_storage_options_as_printed",
    "torchrun -m model.train --cache --nproc_per_node ...":
        "tests/model/test_distributed.py::test_two_processes_match_one_process_with_the_same_global_batch",
    "torchrun -m model.train --batch-scenes --cache --nproc_per_node":
        "tests/model/test_distributed.py::test_two_processes_match_one_process_with_the_same_global_batch",
    "torchrun -m model.train --cache --nproc_per_node --resume":
        "tests/model/test_distributed.py::test_interrupted_ddp_run_resumes_to_the_uninterrupted_metrics",
    "torchrun -m model.train --master_addr --nnodes --node_rank --nproc_per_node ...":
        "tests/model/test_distributed.py::test_two_nodes_as_printed",
}
"""Each test takes its command from README (tests.readme.command(KEY)) and runs it as a
subprocess, with small data and the tiny model substituted for paths and weights. A second
README command of the same key is `KEY #2` (tests.readme.Command.key)."""


def _test_function(node: str):
    """(the test function or None, its module)."""
    path, name = node.split("::")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name, None), module


def _strings(source: str) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(textwrap.dedent(source)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_every_readme_command_is_run_by_a_test():
    shown = {found.key: found for found in commands()}
    missing = [f"README line {found.line}: {found.text}  (key {key!r})"
               for key, found in shown.items() if key not in RUN_BY]
    assert not missing, ("README shows commands no test runs; add a test that runs "
                         "tests.readme.command(KEY) and register it in RUN_BY:\n"
                         + "\n".join(missing))
    stale = sorted(set(RUN_BY) - set(shown))
    assert not stale, f"RUN_BY names commands README no longer shows: {stale}"
    for key, node in RUN_BY.items():
        function, module = _test_function(node)
        assert function is not None, f"{node} (for {key!r}) does not exist"
        # the key in the test, or in its module (a constant its fixtures share with it)
        assert key in _strings(inspect.getsource(function)) | _strings(inspect.getsource(module)), \
            f"{node} does not take {key!r} from README (tests.readme.command)"
        if module.__name__ != __name__:  # `make test` is this suite: checked, not run
            assert "command" in module.__dict__, \
                f"{node}'s module does not use tests.readme.command"


def test_the_readme_parser_sees_blocks_tables_and_continuations(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "| command | what |\n| --- | --- |\n| `python -m a.b X [--quick]` + `prefect deployment "
        "run 'x/y' --param ...` | z |\n\n```bash\nexport A=1\n. .venv/bin/activate\n"
        "python -m c.d --root /x \\\n    --store y   # a comment\n"
        "torchrun --nproc_per_node 2 -m model.train ...\npython -m c.d --store z --root /y\n```\n"
        "\n```python\npython -m no.t\n```\n")
    found = commands(readme)
    assert [c.key for c in found] == [
        "python -m a.b --quick", "prefect deployment run --param ...",
        "python -m c.d --root --store", "torchrun -m model.train --nproc_per_node ...",
        "python -m c.d --root --store #2"]
    assert found[2].words == ("python", "-m", "c.d", "--root", "/x", "--store", "y")
    assert found[2].line == 8


def test_make_test_is_the_suite_ci_runs():
    """`make test` runs this suite, so no test can run it: CI runs it (.ci/run), and it is
    the Makefile's pytest over tests/."""
    assert "make test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test: .*\n\t\$\(PY\) -m pytest", makefile, re.M)


def test_readme_cites_only_files_in_the_repository():
    text = README.read_text()
    documents = set(re.findall(r"[\w./-]+\.md\b", text))  # BENCHMARKS.md, ...
    links = set(re.findall(r"\]\((?!https?://)([^)#]+)", text))
    sources = set(re.findall(r"\b((?:tests|flows|model|pipeline|storage|benchmarks)/[\w/]+\.py)\b",
                             text))
    missing = sorted(path for path in documents | links | sources if not (REPO / path).exists())
    assert not missing, f"README cites files that are not in the repository: {missing}"
