"""Ray Tune sweeps over any config path, each trial the same `harma.train.driver.fit`."""
