"""Rows to tokenised examples: where rows come from (datasource.py) and their check before any model
loads (precheck.py), a row through the template, target or labels (formatting.py) or a chat template
(chat.py), the label-word rule (labels.py), and padded batches in training or evaluation order
(batching.py). Nothing here runs the model.
"""
