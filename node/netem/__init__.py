"""Network emulation for lowband: links with bandwidth, latency, loss and outages (``link``), network
namespaces shaped by ``tc`` (``netns``), profiles and churn schedules as data (``profiles``, ``churn``)."""
