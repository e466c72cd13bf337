from data_pipeline.prepare.pipeline import main

main()
