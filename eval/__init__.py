"""vlp's evaluators and the `vlp-eval` CLI.

Entry points for other code (import the modules; this package imports nothing eagerly, so
`vlp-eval --help` starts fast):

- eval.checkpoints.resolve_checkpoint(path, model_name) -> CheckpointRef
- eval.models.load_model(ref, device, precision) -> EvalModel, or EvalModel(module, ...) directly
- eval.datasets.open_eval_set(dir) -> EvalSet
- eval.tasks.evaluate(model, dataset, task, options) -> EvalResult; or per task
  eval.zero_shot.evaluate_zeroshot_classification, eval.retrieval.evaluate_zeroshot_retrieval,
  eval.tasks.evaluate_geometry
- eval.geometry: modality_gap, uniformity, cross_uniformity, alignment, ... on tensors
- eval.report.write_report(run_dir, datasets, output_dir, ...) -> Path of report.md
"""
