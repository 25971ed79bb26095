"""sshlog plugin: an action that appends chosen event fields to a CSV file.

    actions:
      - action: commands_csv
        plugin: csv_action
        path: /var/log/sshlog/commands.csv           # required
        fields: [timestamp, username, client_ip, args] # optional (this is the default)

Copy to /etc/sshlog/plugins/ (or pass --plugin-dir).
"""
import csv
import os

import sshlog

SSHLOG_PLUGIN_API = "1.0"

FIELDS = ["timestamp", "event_type", "username", "client_ip", "args"]


@sshlog.register_action("csv_action", "(plugin) append chosen fields of each event to a "
                        "CSV file")
class CsvAction(sshlog.Action):
    PARAMS = (sshlog.Param("path", "str", help="CSV file to append to"),
              sshlog.Param("fields", "strlist", FIELDS, "event fields, one column each"))

    @classmethod
    def check(cls, params):
        # called by check-config and the daemon after the types were checked
        if not params["fields"]:
            return ["fields: name at least one event field"]
        return []

    def __init__(self, name, params):
        super().__init__(name, params)
        self.path = params["path"]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        new = not os.path.exists(self.path)
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(params["fields"])

    def handle(self, event):
        # runs in this action's own worker thread, one event at a time
        data = event.to_dict()
        self.writer.writerow([sshlog.field_text(data.get(f)) for f in self.params["fields"]])
        self.file.flush()

    def close(self):
        self.file.close()
