"""Training: the recipe and its loop (train.py), what a run trains behind one protocol (methods.py,
prefix_method.py), the run folder (rundir.py), experiment trackers (trackers.py), and the methods
measured against each other on one split (compare.py, with measure.py's peak memory). It sits
above evaluation/, which the loop runs on held-out data.
"""
