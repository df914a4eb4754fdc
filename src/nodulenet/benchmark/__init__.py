"""Cross-validated benchmarks from a public dataset download to the paper's tables, in one resumable command.

- :func:`nodulenet.benchmark.luna16_api.benchmark_luna16`: ``nodulenet benchmark luna16`` (LUNA16 10-fold CPM);
- :func:`nodulenet.benchmark.lidc_api.benchmark_lidc`: ``nodulenet benchmark lidc`` (LIDC-IDRI Dice/IoU per nodule).

See ``docs/benchmark.md``. The stages reuse the project's own: preparation (:mod:`nodulenet.preprocess.prepare_dataset`),
training (:func:`nodulenet.train.loop.train`), prediction (:mod:`nodulenet.predict_api`, candidates-only for the
FROC) and evaluation (:mod:`nodulenet.evaluate`).
"""
