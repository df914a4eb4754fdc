"""Into the hospital: DICOMweb (QIDO-RS/WADO-RS/STOW-RS) and DICOM networking (C-ECHO/C-STORE) around predict.

- :mod:`.auth` - DICOMweb credentials: none, HTTP basic or a bearer token, read from a file;
- :mod:`.dicomweb` - the DICOMweb client (``dicomweb-client``): find the CT series of a study, fetch it, store
  results;
- :mod:`.predict_dicomweb` - ``nodulenet predict --dicomweb URL --study UID [--store-results]``;
- :mod:`.scu` / :mod:`.destination` - sending SEG + SR to a DICOM node (C-STORE SCU) or a DICOMweb server;
- :mod:`.listener` - the C-STORE SCP of ``nodulenet serve --dicom-port``: series in, jobs into the server's queue;
- :mod:`.delivery` - the durable record of sending each job's SEG + SR, retried until it is sent;
- :mod:`.service` - what ``nodulenet serve`` starts and stops for the above.

Needs the ``pacs`` extra (``pynetdicom``, ``dicomweb-client``); the modules import them lazily where they can.
"""
