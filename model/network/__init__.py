"""The fusion network, apart from the commands that train, evaluate and query it: the 3D
backbone behind its Protocol (`backbones`, `backbone`), the 2D-3D fusion gate (`fusion`), the
semantic and instance heads (`heads`, `instance`) and the losses (`losses`). Nothing here reads
a store, a checkpoint or a command line."""
