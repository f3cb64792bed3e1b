"""napari plugin (extra ``[napari]``; manifest ``napari.yaml``): a reader for the three file kinds
of docs/formats.md (:mod:`.reader`) and a dock widget showing the volumes of a running
``biref serve`` as they arrive (:mod:`.widget`). Nothing here imports napari until napari calls it."""
