"""Console scripts (instseg-eval, ...). Not named `cli`: Kedro reserves <package>.cli."""
