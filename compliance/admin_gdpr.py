"""The console pages of the compliance officer's work (issue 11): data subject requests,
consent, SOX changes and approvals, legal holds and purges, reports and violations."""
