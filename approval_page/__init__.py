"""The approval page: approvers review a plan and sign their decision in the browser."""
