"""A stand-in for Colab's ``google.colab`` package, for running the notebooks as Colab would.

Only what our notebooks call: ``drive.mount`` (makes ``<mountpoint>/MyDrive``) and
``files.upload`` / ``files.download`` (read from and record into folders named by
``FAKE_COLAB_UPLOADS`` and ``FAKE_COLAB_DOWNLOADS``).
"""

from google.colab import drive, files  # noqa: F401
