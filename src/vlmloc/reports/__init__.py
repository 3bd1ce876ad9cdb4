"""Reports: the tables and figures of each experiment, rebuilt from a run's result rows and its
config alone. Nothing here loads a model or imports the engine."""
