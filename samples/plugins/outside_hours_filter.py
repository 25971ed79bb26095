"""sshlog plugin: a filter that matches events happening outside working hours.

    filters:
      outside_hours: "08:00-18:00"        # local time; the event passes outside it
      outside_hours: "08:00-18:00 Mon-Fri"  # ... or on any day other than Mon-Fri

Copy to /etc/sshlog/plugins/ (or pass --plugin-dir).
"""
import re
import time

import sshlog

SSHLOG_PLUGIN_API = "1.0"

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
SPEC = re.compile(r"\s*(\d\d?):(\d\d)\s*-\s*(\d\d?):(\d\d)"
                  r"(?:\s+(mon|tue|wed|thu|fri|sat|sun)\s*-\s*(mon|tue|wed|thu|fri|sat|sun))?\s*$",
                  re.IGNORECASE)


@sshlog.register_filter("outside_hours", sshlog.EVENT_TYPES, "str",
                        "(plugin) the event happened outside 'HH:MM-HH:MM [Day-Day]', "
                        "local time")
class OutsideHours(sshlog.Filter):
    def __init__(self, arg):
        super().__init__(arg)
        m = SPEC.match(arg)
        if not m:
            # a ValueError is reported by check-config as FILE: key.path: message
            raise ValueError("expected 'HH:MM-HH:MM' or 'HH:MM-HH:MM Mon-Fri', got %r" % arg)
        h1, m1, h2, m2 = (int(x) for x in m.group(1, 2, 3, 4))
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59:
            raise ValueError("not a time of day: %r" % arg)
        self.start, self.end = h1 * 60 + m1, h2 * 60 + m2
        first, last = (DAYS.index(d.lower()) for d in m.group(5, 6)) if m.group(5) else (0, 6)
        self.days = {d % 7 for d in range(first, last + 1 + (7 if last < first else 0))}

    def match(self, event):
        t = time.localtime(event.timestamp)
        minute = t.tm_hour * 60 + t.tm_min
        inside = t.tm_wday in self.days and self.start <= minute < self.end
        return not inside
